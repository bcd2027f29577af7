//! transformers' `BertModel` as a frozen text encoder: embeddings and the stack of
//! post-LN transformer layers, returning `last_hidden_state` (the pooler is not run).
//!
//! Reference: transformers `models/bert/modeling_bert.py` (`BertEmbeddings`,
//! `BertSelfAttention`, `BertSelfOutput`, `BertIntermediate`, `BertOutput`,
//! `BertLayer`). Parameter names equal its state-dict keys, e.g.
//! `encoder.layer.0.attention.self.query.weight`; the checkpoint's
//! `embeddings.position_ids` buffer and `pooler.*` are accepted and unused.
//!
//! What is fixed: absolute positions `0..L`, token type 0 for every token (one
//! segment, as text-to-image pipelines call it), no dropout. Masked keys get
//! `finfo(dtype).min` added to their scores, as transformers' eager path does;
//! the attention itself is libtorch's scaled-dot-product attention.

use tch::{Kind, Tensor};

use super::config::BertConfig;
use super::parts::{additive_mask, check_inputs, embedding, LayerNorm, Linear};
use crate::nn::error::{NnError, Result};
use crate::nn::layers::Activation;

/// Checkpoint tensors that `BertModel` may hold and the encoder does not use.
pub fn ignorable(name: &str) -> bool {
    name == "embeddings.position_ids" || name == "embeddings.token_type_ids" || name.starts_with("pooler.")
}

/// `BertModel` without its pooler.
#[derive(Debug)]
pub struct BertModel {
    embeddings: Embeddings,
    encoder: Vec<Layer>,
    max_positions: i64,
}

/// `embeddings.*`: word + position + token-type 0, then LayerNorm.
#[derive(Debug)]
struct Embeddings {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    layer_norm: LayerNorm,
}

/// `encoder.layer.{i}.*`.
#[derive(Debug)]
struct Layer {
    attention: SelfAttention,
    /// `attention.output.{dense, LayerNorm}`: projection, residual, post-LN.
    attention_output: Residual,
    /// `intermediate.dense` followed by `hidden_act`.
    intermediate: Linear,
    act: Activation,
    /// `output.{dense, LayerNorm}`.
    output: Residual,
}

/// `attention.self.{query, key, value}`.
#[derive(Debug)]
struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    heads: i64,
}

/// `dense` then `LayerNorm(x + residual)`: BertSelfOutput and BertOutput alike.
#[derive(Debug)]
struct Residual {
    dense: Linear,
    layer_norm: LayerNorm,
}

impl BertModel {
    /// Declares every parameter under `p` (normally the `VarStore` root).
    pub fn new(p: &tch::nn::Path<'_>, cfg: &BertConfig) -> Self {
        let h = cfg.hidden_size;
        let emb = p / "embeddings";
        let embeddings = Embeddings {
            word_embeddings: embedding(&emb / "word_embeddings", cfg.vocab_size, h),
            position_embeddings: embedding(&emb / "position_embeddings", cfg.max_position_embeddings, h),
            token_type_embeddings: embedding(&emb / "token_type_embeddings", cfg.type_vocab_size, h),
            layer_norm: LayerNorm::new(&emb / "LayerNorm", h, cfg.layer_norm_eps),
        };
        let layers = p / "encoder" / "layer";
        let encoder = (0..cfg.num_hidden_layers).map(|i| Layer::new(&(&layers / i), cfg)).collect();
        Self { embeddings, encoder, max_positions: cfg.max_position_embeddings }
    }

    /// `last_hidden_state` [B, L, H] for `input_ids` [B, L] and `attention_mask`
    /// [B, L] (1 = token, 0 = padding), in the parameters' kind and device.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (_, len) = check_inputs(input_ids, attention_mask)?;
        if len > self.max_positions {
            return Err(NnError::input(
                "input_ids",
                format!("{len} tokens exceed max_position_embeddings {}", self.max_positions),
            ));
        }
        let mut x = self.embeddings.forward(input_ids)?;
        let mask = additive_mask(attention_mask, x.kind())?;
        for layer in &self.encoder {
            x = layer.forward(&x, &mask)?;
        }
        Ok(x)
    }
}

impl Embeddings {
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let len = input_ids.size()[1];
        let device = self.word_embeddings.device();
        let positions = Tensor::f_arange(len, (Kind::Int64, device))?;
        let words = Tensor::f_embedding(&self.word_embeddings, input_ids, -1, false, false)?;
        let pos = Tensor::f_embedding(&self.position_embeddings, &positions, -1, false, false)?;
        // Token type 0 for every token: row 0 of the table, broadcast.
        let token_type = self.token_type_embeddings.f_get(0)?;
        // transformers' order: (words + token type) + positions.
        let x = words.f_add(&token_type)?.f_add(&pos.f_unsqueeze(0)?)?;
        self.layer_norm.forward(&x)
    }
}

impl Layer {
    fn new(p: &tch::nn::Path<'_>, cfg: &BertConfig) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let attn = p / "attention";
        let this = &attn / "self";
        Self {
            attention: SelfAttention {
                query: Linear::new(&this / "query", h, h, true),
                key: Linear::new(&this / "key", h, h, true),
                value: Linear::new(&this / "value", h, h, true),
                heads: cfg.num_attention_heads,
            },
            attention_output: Residual::new(&(&attn / "output"), h, h, cfg.layer_norm_eps),
            intermediate: Linear::new(p / "intermediate" / "dense", h, i, true),
            act: cfg.hidden_act,
            output: Residual::new(&(p / "output"), i, h, cfg.layer_norm_eps),
        }
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let attended = self.attention.forward(x, mask)?;
        let x = self.attention_output.forward(&attended, x)?;
        let inner = self.act.forward(&self.intermediate.forward(&x)?);
        self.output.forward(&inner, &x)
    }
}

impl SelfAttention {
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let size = x.size();
        let (b, l, h) = (size[0], size[1], size[2]);
        let split = |t: Tensor| -> Result<Tensor> { Ok(t.f_view([b, l, self.heads, h / self.heads])?.f_transpose(1, 2)?) };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        // Default scale 1/√d_head, as BertSelfAttention.
        let out = Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, None, false)?;
        Ok(out.f_transpose(1, 2)?.f_reshape([b, l, h])?)
    }
}

impl Residual {
    fn new(p: &tch::nn::Path<'_>, in_dim: i64, out_dim: i64, eps: f64) -> Self {
        Self { dense: Linear::new(p / "dense", in_dim, out_dim, true), layer_norm: LayerNorm::new(p / "LayerNorm", out_dim, eps) }
    }

    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.layer_norm.forward(&self.dense.forward(x)?.f_add(residual)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::weights;

    fn tiny() -> BertConfig {
        BertConfig {
            vocab_size: 11,
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 5,
            hidden_act: Activation::Gelu,
            max_position_embeddings: 6,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
        }
    }

    #[test]
    fn parameter_names_are_transformers_keys() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _model = BertModel::new(&vs.root(), &tiny());
        let vars = vs.variables();
        for key in [
            "embeddings.word_embeddings.weight",
            "embeddings.LayerNorm.bias",
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.1.attention.output.LayerNorm.weight",
            "encoder.layer.1.intermediate.dense.bias",
            "encoder.layer.0.output.dense.weight",
        ] {
            assert!(vars.contains_key(key), "missing {key}");
        }
        // 5 embedding tensors + 16 per layer.
        assert_eq!(vars.len(), 5 + 2 * 16);
        assert_eq!(vars["encoder.layer.0.output.dense.weight"].size(), [8, 5]);
    }

    #[test]
    fn a_checkpoint_missing_a_tensor_fails_listing_it() {
        let dir = std::env::temp_dir().join(format!("diffusiond-bert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("model.safetensors");
        let full = tch::nn::VarStore::new(tch::Device::Cpu);
        let _ = BertModel::new(&full.root(), &tiny());
        let mut tensors: std::collections::BTreeMap<String, Tensor> = full.variables().into_iter().collect();
        tensors.remove("encoder.layer.1.attention.self.key.bias");
        tensors.insert("pooler.dense.bias".into(), Tensor::zeros([8], (Kind::Float, tch::Device::Cpu)));
        weights::save_tensors(&tensors, &file).unwrap();

        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let _ = BertModel::new(&vs.root(), &tiny());
        let msg = weights::load_into(&vs, &[file], &ignorable).unwrap_err().to_string();
        assert!(msg.contains("missing (1): encoder.layer.1.attention.self.key.bias"), "{msg}");
        assert!(!msg.contains("pooler"), "the pooler is ignorable: {msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn too_long_inputs_are_an_error() {
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let model = BertModel::new(&vs.root(), &tiny());
        let ids = Tensor::zeros([1, 7], (Kind::Int64, tch::Device::Cpu));
        let msg = model.forward(&ids, &ids.ones_like()).unwrap_err().to_string();
        assert!(msg.contains("max_position_embeddings 6"), "{msg}");
        let ok = tch::no_grad(|| model.forward(&ids.narrow(1, 0, 6), &ids.narrow(1, 0, 6).ones_like())).unwrap();
        assert_eq!(ok.size(), [1, 6, 8]);
    }
}
