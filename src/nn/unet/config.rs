//! `config.json` of a diffusers `UNet2DConditionModel`, read and written exactly
//! as diffusers does, and resolved into per-block settings.
//!
//! Every `__init__` argument of diffusers 0.42's `UNet2DConditionModel` is a field
//! here with diffusers' default, so a config written by `save_pretrained` parses
//! and one we write loads in `from_pretrained`. Keys starting with `_`
//! (`_class_name`, `_diffusers_version`, …) are metadata. A key diffusers does
//! not know, or a value selecting a feature we do not implement, is an error
//! naming the field: a silently ignored option would run a different network
//! than the checkpoint was trained as.
//!
//! Supported subset: the blocks DeepFloyd IF uses (`ResnetDownsampleBlock2D`,
//! `SimpleCrossAttnDownBlock2D`, `UNetMidBlock2DSimpleCrossAttn`,
//! `SimpleCrossAttnUpBlock2D`, `ResnetUpsampleBlock2D`), positional timestep
//! embeddings, `class_embed_type` `timestep` (SR noise level) and `identity`
//! (unCLIP's decoder: a vector added to the timestep embedding), `addition_embed_type`
//! `text` and `encoder_hid_dim_type` `text_proj`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::nn::config_file::{in_file, invalid, unsupported};
use crate::nn::error::{NnError, Result};
use crate::nn::layers::Activation;

/// The diffusers version whose config format we read and write.
pub const DIFFUSERS_VERSION: &str = "0.42.1";
pub const CLASS_NAME: &str = "UNet2DConditionModel";

/// An `int | list` config value, broadcast over the blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn expand(&self, field: &str, n: usize) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(invalid(field, format!("has {} entries for {n} down blocks", v.len()))),
        }
    }
}

/// `sample_size`: an int or `[height, width]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(i64),
    HeightWidth([i64; 2]),
}

/// The raw config: field names, types and defaults of diffusers'
/// `UNet2DConditionModel.__init__`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UNetConfig {
    pub sample_size: Option<SampleSize>,
    pub in_channels: i64,
    pub out_channels: i64,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: PerBlock<i64>,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub dropout: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<i64>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<i64>,
    pub transformer_layers_per_block: Value,
    pub reverse_transformer_layers_per_block: Value,
    pub encoder_hid_dim: Option<i64>,
    pub encoder_hid_dim_type: Option<String>,
    pub attention_head_dim: PerBlock<i64>,
    pub num_attention_heads: Option<Value>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<i64>,
    pub num_class_embeds: Option<i64>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<i64>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<i64>,
    pub conv_in_kernel: i64,
    pub conv_out_kernel: i64,
    pub projection_class_embeddings_input_dim: Option<i64>,
    pub attention_type: String,
    pub class_embeddings_concat: bool,
    pub mid_block_only_cross_attention: Option<bool>,
    pub cross_attention_norm: Option<String>,
    pub addition_embed_type_num_heads: i64,
}

impl Default for UNetConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: s(&["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: s(&["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: Value::from(1),
            reverse_transformer_layers_per_block: Value::Null,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".into(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

/// The kind of a down or up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `ResnetDownsampleBlock2D` / `ResnetUpsampleBlock2D`: ResNets only.
    Resnet,
    /// `SimpleCrossAttnDownBlock2D` / `SimpleCrossAttnUpBlock2D`: each ResNet followed
    /// by attention over [text tokens; image tokens].
    SimpleCrossAttn,
}

/// How the time embedding enters a ResNet block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeScaleShift {
    /// Added to the activations before the second GroupNorm (DDPM).
    Default,
    /// AdaGN: GroupNorm(h)·(1 + scale) + shift (ADM).
    ScaleShift,
}

/// Settings shared by every ResNet and attention layer of one model.
#[derive(Debug, Clone, Copy)]
pub struct LayerSettings {
    pub act: Activation,
    pub groups: i64,
    pub eps: f64,
    pub temb_channels: i64,
    pub time_scale_shift: TimeScaleShift,
    pub skip_time_act: bool,
    pub dropout: f64,
    pub cross_attention_norm: bool,
}

/// One down or up block, resolved.
#[derive(Debug, Clone)]
pub struct BlockSpec {
    pub kind: BlockKind,
    pub layers: i64,
    pub in_channels: i64,
    pub out_channels: i64,
    /// For up blocks: the channels coming from the block below.
    pub prev_output_channels: i64,
    pub resample: bool,
    pub head_dim: i64,
    pub cross_attention_dim: i64,
    pub only_cross_attention: bool,
    pub output_scale_factor: f64,
}

/// The middle block, resolved.
#[derive(Debug, Clone)]
pub struct MidSpec {
    pub channels: i64,
    pub head_dim: i64,
    pub cross_attention_dim: i64,
    pub only_cross_attention: bool,
    pub output_scale_factor: f64,
}

/// How `class_labels` enter the timestep embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassEmbedding {
    /// A scalar per sample, embedded like a timestep (IF's SR noise level).
    Timestep,
    /// A `[B, time_embed_dim]` vector used as it is (unCLIP's decoder, which
    /// is given the projected CLIP embeddings there).
    Identity,
}

/// Everything the model constructor needs, validated.
#[derive(Debug, Clone)]
pub struct UNetSpec {
    pub layer: LayerSettings,
    pub time_channels: i64,
    pub time_embed_dim: i64,
    pub time_embedding_act: Option<Activation>,
    pub timestep_post_act: Option<Activation>,
    pub class_embedding: Option<ClassEmbedding>,
    pub class_embeddings_concat: bool,
    pub text_time_embedding: Option<(i64, i64)>,
    pub encoder_hid_proj: Option<(i64, i64)>,
    pub down: Vec<BlockSpec>,
    pub mid: Option<MidSpec>,
    pub up: Vec<BlockSpec>,
}



fn activation(field: &str, name: &str) -> Result<Activation> {
    Activation::from_name(name).ok_or_else(|| unsupported(field, format!("activation `{name}`")))
}

impl UNetConfig {
    /// Parses a config as diffusers writes it; errors name `file` and the field.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|source| NnError::Json { file: "config.json".into(), source })?;
        let Value::Object(mut map) = value else {
            return Err(invalid("config", "not a JSON object"));
        };
        if let Some(class) = map.get("_class_name").and_then(Value::as_str) {
            if class != CLASS_NAME {
                return Err(unsupported("_class_name", format!("`{class}` (expected {CLASS_NAME})")));
            }
        }
        map.retain(|k, _| !k.starts_with('_'));
        let config: UNetConfig = serde_json::from_value(Value::Object(map))
            .map_err(|source| NnError::Json { file: "config.json".into(), source })?;
        config.spec()?;
        Ok(config)
    }

    /// Reads `dir/config.json`; errors name the file.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|e| NnError::io(&file, e))?;
        Self::from_json(&text).map_err(|e| in_file(e, &file))
    }

    /// The config as diffusers' `save_pretrained` writes it.
    pub fn to_json(&self) -> String {
        let mut value = serde_json::to_value(self).expect("config serialises");
        if let Value::Object(map) = &mut value {
            map.insert("_class_name".into(), CLASS_NAME.into());
            map.insert("_diffusers_version".into(), DIFFUSERS_VERSION.into());
        }
        serde_json::to_string_pretty(&value).expect("config serialises") + "\n"
    }

    /// Validates the config and resolves per-block values, following the order
    /// in which diffusers' constructor derives them.
    pub fn spec(&self) -> Result<UNetSpec> {
        self.check_unsupported()?;
        let n = self.down_block_types.len();
        if n == 0 || self.up_block_types.len() != n || self.block_out_channels.len() != n {
            return Err(invalid(
                "down_block_types",
                "down_block_types, up_block_types and block_out_channels must have the same non-zero length",
            ));
        }
        let groups = self.norm_num_groups.ok_or_else(|| unsupported("norm_num_groups", "null (no output norm)"))?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c <= 0 || c % groups != 0 {
                return Err(invalid("block_out_channels", format!("entry {i} ({c}) is not a positive multiple of norm_num_groups ({groups})")));
            }
        }
        let only_cross = self.only_cross_attention.expand("only_cross_attention", n)?;
        let mid_only_cross = self.mid_block_only_cross_attention.unwrap_or(match self.only_cross_attention {
            PerBlock::One(b) => b,
            PerBlock::Each(_) => false,
        });
        let head_dim = self.attention_head_dim.expand("attention_head_dim", n)?;
        let cross_dim = self.cross_attention_dim.expand("cross_attention_dim", n)?;
        let layers = self.layers_per_block.expand("layers_per_block", n)?;

        let time_channels = self.block_out_channels[0];
        let time_embed_dim = self.time_embedding_dim.unwrap_or(time_channels * 4);
        let temb_channels = if self.class_embeddings_concat { 2 * time_embed_dim } else { time_embed_dim };
        let layer = LayerSettings {
            act: activation("act_fn", &self.act_fn)?,
            groups,
            eps: self.norm_eps,
            temb_channels,
            time_scale_shift: match self.resnet_time_scale_shift.as_str() {
                "default" => TimeScaleShift::Default,
                "scale_shift" => TimeScaleShift::ScaleShift,
                other => return Err(unsupported("resnet_time_scale_shift", format!("`{other}`"))),
            },
            skip_time_act: self.resnet_skip_time_act,
            dropout: self.dropout,
            cross_attention_norm: match self.cross_attention_norm.as_deref() {
                None => false,
                Some("group_norm") => true,
                Some(other) => return Err(unsupported("cross_attention_norm", format!("`{other}`"))),
            },
        };

        let block_kind = |field: &str, name: &str, resnet: &str, attn: &str| match name {
            n if n == resnet => Ok(BlockKind::Resnet),
            n if n == attn => Ok(BlockKind::SimpleCrossAttn),
            other => Err(unsupported(field, format!("block type `{other}` (supported: {resnet}, {attn})"))),
        };
        let mut down = Vec::with_capacity(n);
        let mut out_ch = self.block_out_channels[0];
        for i in 0..n {
            let in_ch = out_ch;
            out_ch = self.block_out_channels[i];
            let kind = block_kind("down_block_types", &self.down_block_types[i], "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")?;
            down.push(BlockSpec {
                kind,
                layers: layers[i],
                in_channels: in_ch,
                out_channels: out_ch,
                prev_output_channels: 0,
                resample: i + 1 < n,
                head_dim: head_dim[i],
                cross_attention_dim: cross_dim[i],
                only_cross_attention: only_cross[i],
                output_scale_factor: self.resnet_out_scale_factor,
            });
        }
        let last = self.block_out_channels[n - 1];
        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DSimpleCrossAttn") => Some(MidSpec {
                channels: last,
                head_dim: head_dim[n - 1],
                cross_attention_dim: cross_dim[n - 1],
                only_cross_attention: mid_only_cross,
                output_scale_factor: self.mid_block_scale_factor,
            }),
            Some(other) => return Err(unsupported("mid_block_type", format!("`{other}` (supported: UNetMidBlock2DSimpleCrossAttn)"))),
        };
        let rev = |v: &[i64]| v.iter().rev().copied().collect::<Vec<_>>();
        let (rev_ch, rev_layers, rev_cross) = (rev(&self.block_out_channels), rev(&layers), rev(&cross_dim));
        let rev_only: Vec<bool> = only_cross.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_ch = rev_ch[0];
        for i in 0..n {
            let prev = out_ch;
            out_ch = rev_ch[i];
            let kind = block_kind("up_block_types", &self.up_block_types[i], "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")?;
            up.push(BlockSpec {
                kind,
                layers: rev_layers[i] + 1,
                in_channels: rev_ch[(i + 1).min(n - 1)],
                out_channels: out_ch,
                prev_output_channels: prev,
                resample: i + 1 < n,
                // diffusers indexes `attention_head_dim` for up block i without
                // reversing it (unlike every other per-block list); checkpoints
                // depend on that, so we do the same.
                head_dim: head_dim[i],
                cross_attention_dim: rev_cross[i],
                only_cross_attention: rev_only[i],
                output_scale_factor: self.resnet_out_scale_factor,
            });
        }
        for b in down.iter().chain(up.iter()) {
            if b.kind == BlockKind::SimpleCrossAttn && (b.head_dim <= 0 || b.out_channels % b.head_dim != 0) {
                return Err(invalid("attention_head_dim", format!("{} does not divide {} channels", b.head_dim, b.out_channels)));
            }
        }
        if let Some(m) = &mid {
            if m.head_dim <= 0 || m.channels % m.head_dim != 0 {
                return Err(invalid("attention_head_dim", format!("{} does not divide {} channels", m.head_dim, m.channels)));
            }
        }

        let encoder_hid_proj = match (self.encoder_hid_dim_type.as_deref(), self.encoder_hid_dim) {
            (None, None) => None,
            (None | Some("text_proj"), Some(dim)) => Some((dim, cross_dim[0])),
            (Some(t), None) => return Err(invalid("encoder_hid_dim", format!("must be set when encoder_hid_dim_type is `{t}`"))),
            (Some(t), Some(_)) => return Err(unsupported("encoder_hid_dim_type", format!("`{t}` (supported: text_proj)"))),
        };
        let text_time_embedding = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text") => {
                let from = self.encoder_hid_dim.unwrap_or(cross_dim[0]);
                let heads = self.addition_embed_type_num_heads;
                if heads <= 0 || from % heads != 0 {
                    return Err(invalid("addition_embed_type_num_heads", format!("{heads} does not divide {from}")));
                }
                Some((from, heads))
            }
            Some(other) => return Err(unsupported("addition_embed_type", format!("`{other}` (supported: text)"))),
        };
        let class_embedding = match self.class_embed_type.as_deref() {
            None => None,
            Some("timestep") => Some(ClassEmbedding::Timestep),
            Some("identity") => Some(ClassEmbedding::Identity),
            Some(other) => return Err(unsupported("class_embed_type", format!("`{other}` (supported: timestep, identity)"))),
        };
        if self.class_embeddings_concat && class_embedding.is_none() {
            return Err(unsupported("class_embeddings_concat", "true without a class embedding"));
        }
        for (field, k) in [("conv_in_kernel", self.conv_in_kernel), ("conv_out_kernel", self.conv_out_kernel)] {
            if k <= 0 || k % 2 == 0 {
                return Err(invalid(field, format!("{k} (must be a positive odd kernel size)")));
            }
        }
        Ok(UNetSpec {
            layer,
            time_channels,
            time_embed_dim,
            time_embedding_act: self.time_embedding_act_fn.as_deref().map(|a| activation("time_embedding_act_fn", a)).transpose()?,
            timestep_post_act: self.timestep_post_act.as_deref().map(|a| activation("timestep_post_act", a)).transpose()?,
            class_embedding,
            class_embeddings_concat: self.class_embeddings_concat,
            text_time_embedding,
            encoder_hid_proj,
            down,
            mid,
            up,
        })
    }

    /// Options that change the network in ways we do not implement. Options that
    /// the supported blocks never read (`transformer_layers_per_block`,
    /// `use_linear_projection`, `upcast_attention`, `dual_cross_attention`,
    /// `downsample_padding`, …) are accepted: diffusers ignores them for these
    /// blocks too, so they cannot change the result.
    fn check_unsupported(&self) -> Result<()> {
        if self.num_attention_heads.as_ref().is_some_and(|v| !v.is_null()) {
            // diffusers itself rejects this for UNet2DConditionModel.
            return Err(unsupported("num_attention_heads", "set; use attention_head_dim"));
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported("time_embedding_type", format!("`{}` (supported: positional)", self.time_embedding_type)));
        }
        if self.time_cond_proj_dim.is_some() {
            return Err(unsupported("time_cond_proj_dim", "timestep conditioning projection (LCM) is not implemented"));
        }
        if self.num_class_embeds.is_some() && self.class_embed_type.is_none() {
            return Err(unsupported("num_class_embeds", "learned class embeddings are not implemented"));
        }
        if self.attention_type != "default" {
            return Err(unsupported("attention_type", format!("`{}` (GLIGEN) is not implemented", self.attention_type)));
        }
        Ok(())
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of diffusers' own IF test config (tests/pipelines/deepfloyd_if).
    pub(crate) fn tiny_if_json() -> String {
        serde_json::json!({
            "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
            "sample_size": 32, "layers_per_block": [1, 2], "block_out_channels": [32, 64],
            "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
            "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
            "in_channels": 6, "out_channels": 6, "cross_attention_dim": 32, "encoder_hid_dim": 32,
            "attention_head_dim": 8, "addition_embed_type": "text", "addition_embed_type_num_heads": 2,
            "cross_attention_norm": "group_norm", "resnet_time_scale_shift": "scale_shift", "act_fn": "gelu",
            "class_embed_type": "timestep", "mid_block_scale_factor": 1.414, "time_embedding_act_fn": "gelu",
            "time_embedding_dim": 32
        })
        .to_string()
    }

    #[test]
    fn resolves_blocks_like_diffusers() {
        let spec = UNetConfig::from_json(&tiny_if_json()).unwrap().spec().unwrap();
        assert_eq!(spec.down[0].layers, 1);
        assert_eq!(spec.down[1].layers, 2);
        assert!(spec.down[0].resample && !spec.down[1].resample);
        // Up blocks run in reverse with one extra layer each.
        assert_eq!((spec.up[0].layers, spec.up[0].in_channels, spec.up[0].prev_output_channels), (3, 32, 64));
        assert_eq!((spec.up[1].layers, spec.up[1].in_channels, spec.up[1].out_channels), (2, 32, 32));
        assert_eq!(spec.time_embed_dim, 32);
        assert_eq!(spec.text_time_embedding, Some((32, 2)));
        assert_eq!(spec.encoder_hid_proj, Some((32, 32)));
        assert_eq!(spec.class_embedding, Some(ClassEmbedding::Timestep));
    }

    #[test]
    fn round_trips_through_json() {
        let a = UNetConfig::from_json(&tiny_if_json()).unwrap();
        let b = UNetConfig::from_json(&a.to_json()).unwrap();
        assert_eq!(a, b);
        assert!(a.to_json().contains("\"_class_name\": \"UNet2DConditionModel\""));
    }

    #[test]
    fn unsupported_and_unknown_options_name_the_field() {
        let with = |key: &str, value: Value| {
            let mut v: Value = serde_json::from_str(&tiny_if_json()).unwrap();
            v[key] = value;
            UNetConfig::from_json(&v.to_string()).unwrap_err().to_string()
        };
        assert!(with("mid_block_type", "UNetMidBlock2DCrossAttn".into()).contains("`mid_block_type`"));
        assert!(with("class_embed_type", "projection".into()).contains("`class_embed_type`"));
        assert!(with("time_cond_proj_dim", 8.into()).contains("`time_cond_proj_dim`"));
        assert!(with("act_fn", "laplace".into()).contains("`act_fn`"));
        assert!(with("attention_head_dim", 7.into()).contains("`attention_head_dim`"));
        assert!(with("layers_per_block", serde_json::json!([1, 2, 3])).contains("`layers_per_block`"));
        assert!(with("not_a_diffusers_key", 1.into()).contains("not_a_diffusers_key"));
    }
}
