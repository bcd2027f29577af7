//! The `config.json` of diffusers' `PriorTransformer` and
//! `UnCLIPTextProjModel`: every key diffusers writes, with its defaults; an
//! option we do not implement is an error naming the key.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::nn::config_file::{from_dir, from_json, in_file, invalid, unsupported};
use crate::nn::error::{NnError, Result};
use crate::nn::layers::Activation;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriorConfig {
    pub num_attention_heads: i64,
    pub attention_head_dim: i64,
    pub num_layers: i64,
    /// The width of the CLIP embeddings the prior denoises (and of the text tokens).
    pub embedding_dim: i64,
    /// The number of text tokens.
    pub num_embeddings: i64,
    /// Tokens after the text: the projected embedding, the timestep, the noisy
    /// embedding and (with `added_emb_type = "prd"`) the PRD token.
    pub additional_embeddings: i64,
    pub dropout: f64,
    pub time_embed_act_fn: String,
    /// `"layer"`: a LayerNorm on the token sequence before the blocks.
    pub norm_in_type: Option<String>,
    /// `"layer"`: a LayerNorm on the conditioning embedding before its projection.
    pub embedding_proj_norm_type: Option<String>,
    /// `"linear"`: text tokens are projected in and prepended; null: none.
    pub encoder_hid_proj_type: Option<String>,
    /// `"prd"`: a learned last token whose output is the prediction (DALL-E 2
    /// §2.2); null: the outputs after the conditioning tokens are.
    pub added_emb_type: Option<String>,
    pub time_embed_dim: Option<i64>,
    pub embedding_proj_dim: Option<i64>,
    pub clip_embed_dim: Option<i64>,
}

impl Default for PriorConfig {
    fn default() -> Self {
        Self {
            num_attention_heads: 32,
            attention_head_dim: 64,
            num_layers: 20,
            embedding_dim: 768,
            num_embeddings: 77,
            additional_embeddings: 4,
            dropout: 0.0,
            time_embed_act_fn: "silu".into(),
            norm_in_type: None,
            embedding_proj_norm_type: None,
            encoder_hid_proj_type: Some("linear".into()),
            added_emb_type: Some("prd".into()),
            time_embed_dim: None,
            embedding_proj_dim: None,
            clip_embed_dim: None,
        }
    }
}

/// A [`PriorConfig`] with its derived widths and checked options.
#[derive(Debug, Clone, Copy)]
pub struct PriorSpec {
    pub heads: i64,
    pub inner_dim: i64,
    pub time_embed_dim: i64,
    pub embedding_proj_dim: i64,
    pub clip_embed_dim: i64,
    pub time_act: Activation,
    pub norm_in: bool,
    pub embedding_proj_norm: bool,
    pub encoder_hid_proj: bool,
    pub prd: bool,
}

impl PriorConfig {
    pub const CLASS_NAME: &'static str = "PriorTransformer";

    pub fn from_json(text: &str) -> Result<Self> {
        from_json(text, Self::CLASS_NAME)
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        from_dir(dir, Self::CLASS_NAME)
    }

    /// `config.json` as diffusers writes it (with its class name).
    pub fn to_json(&self) -> String {
        diffusers_json(self, Self::CLASS_NAME)
    }

    pub fn spec(&self) -> Result<PriorSpec> {
        let positive = [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("embedding_dim", self.embedding_dim),
        ];
        for (field, value) in positive {
            if value <= 0 {
                return Err(invalid(field, format!("must be positive, got {value}")));
            }
        }
        if self.num_layers < 0 || self.num_embeddings < 0 || self.additional_embeddings < 0 {
            return Err(invalid("num_layers", "num_layers, num_embeddings and additional_embeddings must not be negative"));
        }
        let inner_dim = self.num_attention_heads * self.attention_head_dim;
        let layer_or_none = |field: &str, value: &Option<String>| match value.as_deref() {
            None => Ok(false),
            Some("layer") => Ok(true),
            Some(other) => Err(unsupported(field, format!("`{other}` (layer or null)"))),
        };
        let encoder_hid_proj = match self.encoder_hid_proj_type.as_deref() {
            None => false,
            Some("linear") => true,
            Some(other) => return Err(unsupported("encoder_hid_proj_type", format!("`{other}` (linear or null)"))),
        };
        let prd = match self.added_emb_type.as_deref() {
            None => false,
            Some("prd") => true,
            Some(other) => return Err(unsupported("added_emb_type", format!("`{other}` (prd or null)"))),
        };
        let time_act = Activation::from_name(&self.time_embed_act_fn)
            .ok_or_else(|| unsupported("time_embed_act_fn", format!("activation `{}`", self.time_embed_act_fn)))?;
        Ok(PriorSpec {
            heads: self.num_attention_heads,
            inner_dim,
            time_embed_dim: self.time_embed_dim.unwrap_or(inner_dim),
            embedding_proj_dim: self.embedding_proj_dim.unwrap_or(self.embedding_dim),
            clip_embed_dim: self.clip_embed_dim.unwrap_or(self.embedding_dim),
            time_act,
            norm_in: layer_or_none("norm_in_type", &self.norm_in_type)?,
            embedding_proj_norm: layer_or_none("embedding_proj_norm_type", &self.embedding_proj_norm_type)?,
            encoder_hid_proj,
            prd,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextProjConfig {
    #[serde(default = "default_extra_tokens")]
    pub clip_extra_context_tokens: i64,
    #[serde(default = "default_clip_dim")]
    pub clip_embeddings_dim: i64,
    pub time_embed_dim: i64,
    pub cross_attention_dim: i64,
}

fn default_extra_tokens() -> i64 {
    4
}

fn default_clip_dim() -> i64 {
    768
}

impl TextProjConfig {
    pub const CLASS_NAME: &'static str = "UnCLIPTextProjModel";

    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self = from_json(text, Self::CLASS_NAME)?;
        for (field, value) in [
            ("clip_extra_context_tokens", config.clip_extra_context_tokens),
            ("clip_embeddings_dim", config.clip_embeddings_dim),
            ("time_embed_dim", config.time_embed_dim),
            ("cross_attention_dim", config.cross_attention_dim),
        ] {
            if value <= 0 {
                return Err(invalid(field, format!("must be positive, got {value}")));
            }
        }
        Ok(config)
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|e| NnError::io(&file, e))?;
        Self::from_json(&text).map_err(|e| in_file(e, &file))
    }

    /// `config.json` as diffusers writes it (with its class name).
    pub fn to_json(&self) -> String {
        diffusers_json(self, Self::CLASS_NAME)
    }
}



/// A config as diffusers writes its `config.json`: with its class name and version.
fn diffusers_json(config: &impl Serialize, class: &str) -> String {
    let mut value = serde_json::to_value(config).expect("config serialises");
    if let serde_json::Value::Object(map) = &mut value {
        map.insert("_class_name".into(), class.into());
        map.insert("_diffusers_version".into(), crate::nn::unet::config::DIFFUSERS_VERSION.into());
    }
    serde_json::to_string_pretty(&value).expect("config serialises") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn karlo_prior_config_resolves_its_widths() {
        let text = r#"{"_class_name": "PriorTransformer", "_diffusers_version": "0.12.0", "added_emb_type": "prd",
            "additional_embeddings": 4, "attention_head_dim": 64, "clip_embed_dim": null, "dropout": 0.0,
            "embedding_dim": 768, "embedding_proj_dim": null, "embedding_proj_norm_type": null,
            "encoder_hid_proj_type": "linear", "norm_in_type": "layer", "num_attention_heads": 32,
            "num_embeddings": 77, "num_layers": 20, "time_embed_act_fn": "silu", "time_embed_dim": null}"#;
        let spec = PriorConfig::from_json(text).unwrap().spec().unwrap();
        assert_eq!((spec.inner_dim, spec.time_embed_dim, spec.clip_embed_dim), (2048, 2048, 768));
        assert!(spec.norm_in && spec.prd && spec.encoder_hid_proj && !spec.embedding_proj_norm);
    }

    #[test]
    fn unknown_and_unsupported_options_name_the_key() {
        let err = PriorConfig::from_json(r#"{"norm_in_type": "rms"}"#).unwrap().spec().unwrap_err();
        assert!(err.to_string().contains("norm_in_type"), "{err}");
        let err = PriorConfig::from_json(r#"{"frobnicate": 1}"#).unwrap_err();
        assert!(err.to_string().contains("frobnicate"), "{err}");
        let err = PriorConfig::from_json(r#"{"_class_name": "UNet2DModel"}"#).unwrap_err();
        assert!(err.to_string().contains("_class_name"), "{err}");
        let err = TextProjConfig::from_json(r#"{"time_embed_dim": 0, "cross_attention_dim": 8}"#).unwrap_err();
        assert!(err.to_string().contains("time_embed_dim"), "{err}");
        assert!(TextProjConfig::from_json(r#"{"time_embed_dim": 4}"#).is_err(), "cross_attention_dim is required");
    }
}
