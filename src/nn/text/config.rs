//! The text encoder's `config.json`, exactly as transformers writes it for
//! `BertModel` (configuration_bert.py) and `T5EncoderModel` (configuration_t5.py),
//! validated into the concrete settings our modules are built from.
//!
//! Raw vs validated: the serde structs mirror the file (every field optional,
//! absent ones take transformers' defaults); [`EncoderConfig::from_file`] turns
//! them into [`BertConfig`] / [`T5Config`]. Options transformers knows but we do
//! not implement are an error naming the field, never silently ignored. Keys
//! that only matter for training or generation (dropout, `use_cache`,
//! `initializer_range`, …) are ignored.

use std::path::Path;

use serde::Deserialize;

use crate::nn::error::{NnError, Result};
use crate::nn::layers::Activation;

/// Which architecture a `config.json` describes, with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum EncoderConfig {
    Bert(BertConfig),
    T5(T5Config),
    Clip(ClipTextConfig),
}

/// `CLIPTextModel` / `CLIPTextModelWithProjection` (configuration_clip.py).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    /// The width of `text_embeds` (with a `text_projection`).
    pub projection_dim: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// The end-of-text token, whose output is the pooled one; 2 means the
    /// original CLIP's rule instead (the highest id in the sequence).
    pub eos_token_id: i64,
}

/// transformers' `BertConfig`, restricted to what `BertModel`'s encoder needs.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: Activation,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
}

/// transformers' `T5Config`, restricted to what `T5EncoderModel` needs.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub vocab_size: i64,
    pub d_model: i64,
    pub d_kv: i64,
    pub d_ff: i64,
    pub num_layers: i64,
    pub num_heads: i64,
    pub relative_attention_num_buckets: i64,
    pub relative_attention_max_distance: i64,
    pub layer_norm_epsilon: f64,
    pub feed_forward: FeedForwardProj,
}

/// T5's `feed_forward_proj`: `"{act}"` (original T5: `relu`, one `wi`) or
/// `"gated-{act}"` (t5-v1_1: `wi_0` activated times `wi_1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedForwardProj {
    pub gated: bool,
    pub act: Activation,
}

/// The raw BERT file. Defaults (applied in `validate`) are transformers' own.
#[derive(Debug, Deserialize)]
struct RawBert {
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    intermediate_size: Option<i64>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<i64>,
    type_vocab_size: Option<i64>,
    layer_norm_eps: Option<f64>,
    /// Removed from transformers 5 but present in older files: only absolute
    /// positions are implemented.
    position_embedding_type: Option<String>,
    is_decoder: Option<bool>,
    add_cross_attention: Option<bool>,
}

/// The raw T5 file. `is_decoder` and `use_cache` are ignored: `T5EncoderModel`
/// forces an encoder-only, bidirectional stack whatever the file says.
#[derive(Debug, Deserialize)]
struct RawT5 {
    vocab_size: Option<i64>,
    d_model: Option<i64>,
    d_kv: Option<i64>,
    d_ff: Option<i64>,
    num_layers: Option<i64>,
    num_heads: Option<i64>,
    relative_attention_num_buckets: Option<i64>,
    relative_attention_max_distance: Option<i64>,
    layer_norm_epsilon: Option<f64>,
    feed_forward_proj: Option<String>,
}

/// The raw CLIP text file (transformers' `CLIPTextConfig` defaults).
#[derive(Debug, Deserialize)]
struct RawClipText {
    vocab_size: Option<i64>,
    hidden_size: Option<i64>,
    intermediate_size: Option<i64>,
    projection_dim: Option<i64>,
    num_hidden_layers: Option<i64>,
    num_attention_heads: Option<i64>,
    max_position_embeddings: Option<i64>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
    eos_token_id: Option<i64>,
}

/// Collects errors against one file so each names it.
struct Checker<'a> {
    file: &'a str,
}

impl Checker<'_> {
    fn unsupported(&self, field: &str, reason: impl Into<String>) -> NnError {
        NnError::Unsupported { file: self.file.to_owned(), field: field.to_owned(), reason: reason.into() }
    }

    fn invalid(&self, field: &str, reason: impl Into<String>) -> NnError {
        NnError::Invalid { file: self.file.to_owned(), field: field.to_owned(), reason: reason.into() }
    }

    fn positive(&self, field: &str, value: Option<i64>, default: i64) -> Result<i64> {
        let v = value.unwrap_or(default);
        if v < 1 {
            return Err(self.invalid(field, format!("must be at least 1, got {v}")));
        }
        Ok(v)
    }

    fn epsilon(&self, field: &str, value: Option<f64>, default: f64) -> Result<f64> {
        let v = value.unwrap_or(default);
        if !(v.is_finite() && v > 0.0) {
            return Err(self.invalid(field, format!("must be a positive number, got {v}")));
        }
        Ok(v)
    }

    fn activation(&self, field: &str, name: &str) -> Result<Activation> {
        Activation::from_name(name).ok_or_else(|| self.unsupported(field, format!("activation `{name}` is not implemented")))
    }

    /// A flag we implement only at its neutral value `false`.
    fn off(&self, field: &str, value: Option<bool>) -> Result<()> {
        match value {
            Some(true) => Err(self.unsupported(field, "only false is supported (encoder only)")),
            _ => Ok(()),
        }
    }
}

impl EncoderConfig {
    /// Reads `config.json`, picking the architecture by `model_type`.
    pub fn from_file(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file).map_err(|e| NnError::io(file, e))?;
        Self::from_json_str(&text, &file.display().to_string())
    }

    /// Parses the contents of a `config.json`; `file` names it in errors.
    pub fn from_json_str(text: &str, file: &str) -> Result<Self> {
        let json = |source| NnError::Json { file: file.to_owned(), source };
        let value: serde_json::Value = serde_json::from_str(text).map_err(json)?;
        let check = Checker { file };
        let model_type = value.get("model_type").and_then(|v| v.as_str()).unwrap_or_default();
        match model_type {
            "bert" => Ok(Self::Bert(BertConfig::validate(serde_json::from_value(value).map_err(json)?, &check)?)),
            // mT5 is t5-v1_1's architecture with another vocabulary.
            "t5" | "mt5" => Ok(Self::T5(T5Config::validate(serde_json::from_value(value).map_err(json)?, &check)?)),
            "clip_text_model" => Ok(Self::Clip(ClipTextConfig::validate(serde_json::from_value(value).map_err(json)?, &check)?)),
            "" => Err(check.invalid("model_type", "missing; expected \"bert\", \"t5\" or \"clip_text_model\"")),
            other => Err(check.unsupported("model_type", format!("`{other}`; expected \"bert\", \"t5\", \"mt5\" or \"clip_text_model\""))),
        }
    }

    /// The width of the hidden states the encoder returns.
    pub fn hidden_size(&self) -> i64 {
        match self {
            Self::Bert(c) => c.hidden_size,
            Self::T5(c) => c.d_model,
            Self::Clip(c) => c.hidden_size,
        }
    }
}

impl ClipTextConfig {
    fn validate(raw: RawClipText, check: &Checker<'_>) -> Result<Self> {
        let hidden_size = check.positive("hidden_size", raw.hidden_size, 512)?;
        let num_attention_heads = check.positive("num_attention_heads", raw.num_attention_heads, 8)?;
        if hidden_size % num_attention_heads != 0 {
            return Err(check.invalid("num_attention_heads", format!("{num_attention_heads} does not divide hidden_size {hidden_size}")));
        }
        Ok(Self {
            vocab_size: check.positive("vocab_size", raw.vocab_size, 49408)?,
            hidden_size,
            intermediate_size: check.positive("intermediate_size", raw.intermediate_size, 2048)?,
            projection_dim: check.positive("projection_dim", raw.projection_dim, 512)?,
            num_hidden_layers: check.positive("num_hidden_layers", raw.num_hidden_layers, 12)?,
            num_attention_heads,
            max_position_embeddings: check.positive("max_position_embeddings", raw.max_position_embeddings, 77)?,
            hidden_act: check.activation("hidden_act", raw.hidden_act.as_deref().unwrap_or("quick_gelu"))?,
            layer_norm_eps: check.epsilon("layer_norm_eps", raw.layer_norm_eps, 1e-5)?,
            eos_token_id: raw.eos_token_id.unwrap_or(49407),
        })
    }
}

impl BertConfig {
    fn validate(raw: RawBert, check: &Checker<'_>) -> Result<Self> {
        if let Some(kind) = raw.position_embedding_type.as_deref().filter(|k| *k != "absolute") {
            return Err(check.unsupported("position_embedding_type", format!("only \"absolute\" is supported, got \"{kind}\"")));
        }
        check.off("is_decoder", raw.is_decoder)?;
        check.off("add_cross_attention", raw.add_cross_attention)?;
        let hidden_size = check.positive("hidden_size", raw.hidden_size, 768)?;
        let num_attention_heads = check.positive("num_attention_heads", raw.num_attention_heads, 12)?;
        if hidden_size % num_attention_heads != 0 {
            return Err(check.invalid(
                "num_attention_heads",
                format!("{num_attention_heads} heads do not divide hidden_size {hidden_size}"),
            ));
        }
        Ok(Self {
            vocab_size: check.positive("vocab_size", raw.vocab_size, 30522)?,
            hidden_size,
            num_hidden_layers: check.positive("num_hidden_layers", raw.num_hidden_layers, 12)?,
            num_attention_heads,
            intermediate_size: check.positive("intermediate_size", raw.intermediate_size, 3072)?,
            hidden_act: check.activation("hidden_act", raw.hidden_act.as_deref().unwrap_or("gelu"))?,
            max_position_embeddings: check.positive("max_position_embeddings", raw.max_position_embeddings, 512)?,
            type_vocab_size: check.positive("type_vocab_size", raw.type_vocab_size, 2)?,
            layer_norm_eps: check.epsilon("layer_norm_eps", raw.layer_norm_eps, 1e-12)?,
        })
    }
}

impl T5Config {
    fn validate(raw: RawT5, check: &Checker<'_>) -> Result<Self> {
        let buckets = check.positive("relative_attention_num_buckets", raw.relative_attention_num_buckets, 32)?;
        // Bidirectional buckets: half per direction, and half of those exact.
        let max_exact = buckets / 4;
        if max_exact < 1 {
            return Err(check.invalid("relative_attention_num_buckets", format!("must be at least 4, got {buckets}")));
        }
        let max_distance = check.positive("relative_attention_max_distance", raw.relative_attention_max_distance, 128)?;
        if max_distance <= max_exact {
            return Err(check.invalid(
                "relative_attention_max_distance",
                format!("must exceed the {max_exact} exact buckets, got {max_distance}"),
            ));
        }
        Ok(Self {
            vocab_size: check.positive("vocab_size", raw.vocab_size, 32128)?,
            d_model: check.positive("d_model", raw.d_model, 512)?,
            d_kv: check.positive("d_kv", raw.d_kv, 64)?,
            d_ff: check.positive("d_ff", raw.d_ff, 2048)?,
            num_layers: check.positive("num_layers", raw.num_layers, 6)?,
            num_heads: check.positive("num_heads", raw.num_heads, 8)?,
            relative_attention_num_buckets: buckets,
            relative_attention_max_distance: max_distance,
            layer_norm_epsilon: check.epsilon("layer_norm_epsilon", raw.layer_norm_epsilon, 1e-6)?,
            feed_forward: FeedForwardProj::parse(raw.feed_forward_proj.as_deref().unwrap_or("relu"), check)?,
        })
    }
}

impl FeedForwardProj {
    /// As `T5Config.__init__`: `gated-gelu` means the tanh GELU (`gelu_new`),
    /// any other `gated-{act}` / `{act}` uses `act` by its transformers name.
    fn parse(value: &str, check: &Checker<'_>) -> Result<Self> {
        let field = "feed_forward_proj";
        let (gated, act) = match value.split('-').collect::<Vec<_>>().as_slice() {
            ["gated", "gelu"] => (true, "gelu_new"),
            ["gated", act] => (true, *act),
            [act] => (false, *act),
            _ => return Err(check.invalid(field, format!("`{value}` is neither `gated-{{act}}` nor `{{act}}`"))),
        };
        Ok(Self { gated, act: check.activation(field, act)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<EncoderConfig> {
        EncoderConfig::from_json_str(json, "dir/config.json")
    }

    #[test]
    fn defaults_are_transformers_defaults() {
        let EncoderConfig::Bert(bert) = parse(r#"{"model_type": "bert"}"#).unwrap() else { panic!("not BERT") };
        assert_eq!((bert.hidden_size, bert.num_hidden_layers, bert.max_position_embeddings), (768, 12, 512));
        assert_eq!(bert.hidden_act, Activation::Gelu);
        let EncoderConfig::T5(t5) = parse(r#"{"model_type": "t5", "feed_forward_proj": "gated-gelu"}"#).unwrap() else {
            panic!("not T5")
        };
        assert_eq!(t5.feed_forward, FeedForwardProj { gated: true, act: Activation::GeluTanh });
        assert_eq!((t5.relative_attention_num_buckets, t5.relative_attention_max_distance), (32, 128));
        let EncoderConfig::T5(t5) = parse(r#"{"model_type": "t5"}"#).unwrap() else { panic!("not T5") };
        assert_eq!(t5.feed_forward, FeedForwardProj { gated: false, act: Activation::Relu });
    }

    #[test]
    fn unsupported_options_name_the_field_and_file() {
        for (json, field) in [
            (r#"{"model_type": "bert", "position_embedding_type": "relative_key"}"#, "position_embedding_type"),
            (r#"{"model_type": "bert", "is_decoder": true}"#, "is_decoder"),
            (r#"{"model_type": "bert", "add_cross_attention": true}"#, "add_cross_attention"),
            (r#"{"model_type": "bert", "hidden_act": "laplace"}"#, "hidden_act"),
            (r#"{"model_type": "t5", "feed_forward_proj": "gated-laplace"}"#, "feed_forward_proj"),
            (r#"{"model_type": "roberta"}"#, "model_type"),
        ] {
            let err = parse(json).unwrap_err();
            assert!(matches!(&err, NnError::Unsupported { field: f, .. } if f == field), "{json}: {err}");
            let msg = err.to_string();
            assert!(msg.contains("dir/config.json") && msg.contains(field), "{msg}");
        }
    }

    #[test]
    fn invalid_values_name_the_field() {
        for (json, field) in [
            (r#"{"model_type": "bert", "hidden_size": 30, "num_attention_heads": 4}"#, "num_attention_heads"),
            (r#"{"model_type": "bert", "layer_norm_eps": 0}"#, "layer_norm_eps"),
            (r#"{"model_type": "t5", "relative_attention_max_distance": 8}"#, "relative_attention_max_distance"),
            (r#"{"model_type": "t5", "feed_forward_proj": "gated-gelu-x"}"#, "feed_forward_proj"),
            (r#"{"hidden_size": 8}"#, "model_type"),
        ] {
            let err = parse(json).unwrap_err();
            assert!(matches!(&err, NnError::Invalid { field: f, .. } if f == field), "{json}: {err}");
        }
        assert!(matches!(parse("{"), Err(NnError::Json { .. })));
    }
}
