//! Frozen text encoders and their tokenizer: prompts in, the hidden states that
//! condition the UNet out.
//!
//! A model directory is what transformers' `save_pretrained` writes:
//! `config.json` (its `model_type` picks BERT or T5), `tokenizer.json` (with
//! `tokenizer_config.json` / `special_tokens_map.json` for the padding token) and
//! `model.safetensors` or shards listed by `model.safetensors.index.json`.
//!
//! | module | owns |
//! |---|---|
//! | `config` | `config.json` → validated `BertConfig` / `T5Config` |
//! | `tokenizer` | fixed-length batches of ids and masks from `tokenizer.json` |
//! | `bert` | transformers' `BertModel` encoder (modeling_bert.py) |
//! | `t5` | transformers' `T5EncoderModel` (modeling_t5.py) |
//! | `clip` | transformers' `CLIPTextModel(WithProjection)` (modeling_clip.py), unCLIP's encoder |
//! | `parts` | linear, LayerNorm, attention mask, checkpoint names |
//! | `pooling` | the attention-masked mean of the tokens (sentence-transformers' sentence embedding) |
//!
//! The default encoder is all-MiniLM-L6-v2 (a 6-layer BERT, fetched by
//! `make encoder`); DeepFloyd IF's is T5-v1.1-XXL, read with 77 tokens per prompt.

pub mod bert;
pub mod clip;
pub mod config;
mod parts;
pub mod pooling;
pub mod t5;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

pub use bert::BertModel;
pub use clip::{ClipTextModel, ClipTextOutput};
pub use pooling::mean_pool;
pub use config::{BertConfig, ClipTextConfig, EncoderConfig, FeedForwardProj, T5Config};
pub use t5::{EmbeddingKey, T5Encoder};
pub use tokenizer::{TokenBatch, Tokenizer, TokenizerOptions};

use crate::nn::device::place;
use crate::nn::error::{NnError, Result};
use crate::nn::weights;

/// Tokens per prompt for T5 when not set: DeepFloyd IF's (diffusers' IFPipeline
/// tokenizes with `max_length=77`).
pub const T5_DEFAULT_MAX_LENGTH: usize = 77;

/// Settings for [`TextEncoder::load`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TextEncoderOptions {
    /// Tokens per prompt. BERT: `max_position_embeddings` when `None`, and never
    /// more; T5: [`T5_DEFAULT_MAX_LENGTH`] when `None`.
    pub max_length: Option<usize>,
    /// The padding token, when the tokenizer files do not name one.
    pub pad_token: Option<String>,
    /// The folder with `tokenizer.json` when it is not the model's own (DeepFloyd
    /// IF keeps `text_encoder/` and `tokenizer/` side by side).
    pub tokenizer_dir: Option<PathBuf>,
}

/// The encoder's output for a batch of prompts.
#[derive(Debug)]
pub struct TextEmbeddings {
    /// `last_hidden_state` [B, L, hidden_size], in the model's kind, on its device.
    pub hidden: Tensor,
    /// [B, L] i64 on the model's device: 1 for tokens, 0 for padding.
    pub mask: Tensor,
}

/// The network behind a [`TextEncoder`].
#[derive(Debug)]
enum Model {
    Bert(BertModel),
    T5(T5Encoder),
    Clip(ClipTextModel),
}

/// A frozen text encoder with its tokenizer, loaded from a model directory.
pub struct TextEncoder {
    vs: tch::nn::VarStore,
    model: Model,
    tokenizer: Tokenizer,
    config: EncoderConfig,
    kind: Kind,
    dir: PathBuf,
}

impl std::fmt::Debug for TextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoder")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .field("device", &self.vs.device())
            .field("kind", &self.kind)
            .finish()
    }
}

impl TextEncoder {
    /// Loads `dir` on the CPU in f32; [`TextEncoder::to`] moves it afterwards.
    pub fn load(dir: &Path, options: &TextEncoderOptions) -> Result<Self> {
        let config_file = dir.join("config.json");
        let config = EncoderConfig::from_file(&config_file)?;
        let max_length = max_length(&config, options.max_length, &config_file)?;
        let tokenizer_dir = options.tokenizer_dir.as_deref().unwrap_or(dir);
        let tokenizer =
            Tokenizer::from_dir(tokenizer_dir, &TokenizerOptions { max_length, pad_token: options.pad_token.clone() })?;
        let files = weights::checkpoint_files(dir, "model")?;
        let mut vs = tch::nn::VarStore::new(Device::Cpu);
        let model = match &config {
            EncoderConfig::Bert(cfg) => {
                let model = BertModel::new(&vs.root(), cfg);
                weights::load_into(&vs, &files, &bert::ignorable)?;
                Model::Bert(model)
            }
            EncoderConfig::T5(cfg) => {
                let key = EmbeddingKey::for_checkpoint(&parts::checkpoint_names(&files)?);
                let model = T5Encoder::new(&vs.root(), cfg, key);
                weights::load_into(&vs, &files, &t5::ignorable)?;
                Model::T5(model)
            }
            EncoderConfig::Clip(cfg) => {
                let projection = parts::checkpoint_names(&files)?.contains("text_projection.weight");
                let model = ClipTextModel::new(&vs.root(), cfg, projection);
                weights::load_into(&vs, &files, &clip::ignorable)?;
                Model::Clip(model)
            }
        };
        vs.freeze();
        Ok(Self { vs, model, tokenizer, config, kind: Kind::Float, dir: dir.to_owned() })
    }

    /// Moves the weights to `device` and casts them to `kind` (f32, f16 or bf16).
    pub fn to(&mut self, device: Device, kind: Kind) -> Result<()> {
        place(&mut self.vs, device, kind);
        if kind == Kind::Half && matches!(self.model, Model::T5(_)) {
            t5::keep_wo_in_f32(&self.vs)?;
        }
        self.kind = kind;
        Ok(())
    }

    /// Tokenises `prompts` and runs the encoder. A prompt's embedding is the same
    /// bits whatever other prompts share the batch: the linear layers run one
    /// product per sample, and a lone prompt is run as a pair because libtorch's
    /// kernels take another path for a batch of one.
    pub fn encode(&self, prompts: &[&str]) -> Result<TextEmbeddings> {
        if prompts.len() == 1 {
            let pair = self.encode(&[prompts[0], prompts[0]])?;
            return Ok(TextEmbeddings { hidden: pair.hidden.narrow(0, 0, 1), mask: pair.mask.narrow(0, 0, 1) });
        }
        let batch = self.tokenizer.encode(prompts)?;
        let mask = batch.attention_mask.f_to_device(self.device())?;
        let hidden = self.forward(&batch.input_ids, &mask)?;
        Ok(TextEmbeddings { hidden, mask })
    }

    /// Runs the encoder on ids [B, L] and mask [B, L] (moved to the model's
    /// device), without gradients: `last_hidden_state` [B, L, hidden_size].
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let device = self.device();
        let ids = input_ids.f_to_device(device)?;
        let mask = attention_mask.f_to_device(device)?;
        tch::no_grad(|| match &self.model {
            Model::Bert(model) => model.forward(&ids, &mask),
            Model::T5(model) => model.forward(&ids, &mask),
            Model::Clip(model) => Ok(model.forward(&ids, &mask)?.hidden),
        })
    }

    /// CLIP's projected text embedding (`text_embeds`, `[B, projection_dim]`)
    /// of ids and mask `[B, L]`, which unCLIP's prior is conditioned on; none
    /// for encoders without one.
    pub fn text_embeds(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Option<Tensor>> {
        let Model::Clip(model) = &self.model else { return Ok(None) };
        let device = self.device();
        let (ids, mask) = (input_ids.f_to_device(device)?, attention_mask.f_to_device(device)?);
        Ok(tch::no_grad(|| model.forward(&ids, &mask))?.text_embeds)
    }

    /// The width D of the hidden states.
    pub fn hidden_size(&self) -> i64 {
        self.config.hidden_size()
    }

    /// Tokens per prompt, L.
    pub fn max_length(&self) -> usize {
        self.tokenizer.max_length()
    }

    pub fn config(&self) -> &EncoderConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The kind the weights were cast to (T5 in f16 keeps `wo` in f32).
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The model directory this encoder was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The tokens per prompt: the option, checked against what the model can take,
/// or the architecture's default.
fn max_length(config: &EncoderConfig, requested: Option<usize>, config_file: &Path) -> Result<usize> {
    match (config, requested) {
        (_, Some(0)) => Err(NnError::input("max_length", "must be at least 1")),
        (EncoderConfig::Bert(BertConfig { max_position_embeddings: positions, .. }), Some(n))
        | (EncoderConfig::Clip(ClipTextConfig { max_position_embeddings: positions, .. }), Some(n))
            if n as i64 > *positions =>
        {
            Err(NnError::input("max_length", format!("{n} exceeds max_position_embeddings {positions} in {}", config_file.display())))
        }
        (_, Some(n)) => Ok(n),
        (EncoderConfig::Bert(c), None) => Ok(c.max_position_embeddings as usize),
        (EncoderConfig::T5(_), None) => Ok(T5_DEFAULT_MAX_LENGTH),
        (EncoderConfig::Clip(c), None) => Ok(c.max_position_embeddings as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/text").join(name)
    }

    #[test]
    fn loads_and_reports_its_shape() {
        fn assert_send<T: Send>() {}
        assert_send::<TextEncoder>();
        let bert = TextEncoder::load(&fixture("tiny-bert"), &TextEncoderOptions::default()).unwrap();
        assert_eq!((bert.hidden_size(), bert.max_length()), (32, 24));
        let out = bert.encode(&["a red circle", "zebra"]).unwrap();
        assert_eq!(out.hidden.size(), [2, 24, 32]);
        assert_eq!(out.mask.size(), [2, 24]);
        let opts = TextEncoderOptions { max_length: Some(12), ..Default::default() };
        let t5 = TextEncoder::load(&fixture("tiny-t5"), &opts).unwrap();
        assert_eq!((t5.hidden_size(), t5.max_length()), (32, 12));
        let t5 = TextEncoder::load(&fixture("tiny-t5"), &TextEncoderOptions::default()).unwrap();
        assert_eq!(t5.max_length(), T5_DEFAULT_MAX_LENGTH);
    }

    #[test]
    fn bert_max_length_is_bounded_by_its_positions() {
        let opts = TextEncoderOptions { max_length: Some(25), ..Default::default() };
        let msg = TextEncoder::load(&fixture("tiny-bert"), &opts).unwrap_err().to_string();
        assert!(msg.contains("max_position_embeddings 24") && msg.contains("config.json"), "{msg}");
    }

    #[test]
    fn a_missing_directory_names_the_file() {
        let msg = TextEncoder::load(&fixture("nowhere"), &TextEncoderOptions::default()).unwrap_err().to_string();
        assert!(msg.contains("nowhere/config.json"), "{msg}");
    }
}
