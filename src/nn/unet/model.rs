//! `UNet2DConditionModel`: the ε- (or ε and variance-) predicting UNet of the
//! cascade, for the base stage and the super-resolution stages.
//!
//! Architecture: ADM (Dhariwal & Nichol 2021) with GLIDE's text conditioning, as
//! DeepFloyd IF ships it in diffusers' layout. Inputs are the noisy image
//! (concatenated with the upsampled low-resolution image for SR, "SR by
//! concatenation" from ADM/SR3), the timestep, the text-encoder tokens and, for
//! SR, the noise-augmentation level as a class label (Imagen's noise-conditioning
//! augmentation). The forward pass mirrors diffusers'
//! `UNet2DConditionModel.forward` for the supported options.

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use crate::nn::layers::{ApplyLinear, Conv2d, GroupNorm, Linear};

use super::attention::AttentionMaps;
use super::blocks::{Conditioning, DownBlock, MidBlock, UpBlock};
use super::config::{ClassEmbedding, UNetConfig, UNetSpec};
use super::embeddings::{timestep_embedding, TextTimeEmbedding, TimestepEmbedding};
use crate::nn::error::{NnError, Result};
use crate::nn::weights;

/// The weights file name diffusers reads and writes.
pub const WEIGHTS_STEM: &str = "diffusion_pytorch_model";

/// One denoiser call's inputs. The batch dimension of every tensor is `B`.
pub struct UNetInput<'a> {
    /// `[B, in_channels, H, W]`.
    pub sample: &'a Tensor,
    /// `[B]` (or a scalar, broadcast): diffusion timesteps, possibly fractional.
    pub timesteps: &'a Tensor,
    /// `[B, L, D]`: text-encoder tokens (`D = encoder_hid_dim` or `cross_attention_dim`).
    pub encoder_hidden_states: &'a Tensor,
    /// Required iff the model has a class embedding: `[B]` SR noise-augmentation
    /// levels (`timestep`), or `[B, time_embed_dim]` vectors (`identity`).
    pub class_labels: Option<&'a Tensor>,
    /// `[B, L]`, 1 where a text token is real and 0 where it is padding, which
    /// attention then skips (diffusers' `attention_mask`, as unCLIP's decoder
    /// passes it); none: every token counts.
    pub text_mask: Option<&'a Tensor>,
}

/// The class embedding's module (see [`ClassEmbedding`]).
#[derive(Debug)]
enum ClassEmbed {
    Timestep(TimestepEmbedding),
    Identity,
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    spec: UNetSpec,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    class_embedding: Option<ClassEmbed>,
    add_embedding: Option<TextTimeEmbedding>,
    encoder_hid_proj: Option<Linear>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the model's variables under `p` (randomly initialised).
    pub fn new(p: &nn::Path, config: &UNetConfig) -> Result<Self> {
        let spec = config.spec()?;
        let layer = spec.layer;
        let first = config.block_out_channels[0];
        let conv = |name: &str, i: i64, o: i64, k: i64| Conv2d::new(p / name, i, o, k);
        let time_embedding =
            TimestepEmbedding::new(p / "time_embedding", spec.time_channels, spec.time_embed_dim, layer.act, spec.timestep_post_act);
        let class_embedding = spec.class_embedding.map(|kind| match kind {
            ClassEmbedding::Timestep => ClassEmbed::Timestep(TimestepEmbedding::new(
                p / "class_embedding",
                spec.time_channels,
                spec.time_embed_dim,
                layer.act,
                None,
            )),
            ClassEmbedding::Identity => ClassEmbed::Identity,
        });
        let add_embedding = spec
            .text_time_embedding
            .map(|(from, heads)| TextTimeEmbedding::new(p / "add_embedding", from, spec.time_embed_dim, heads));
        let encoder_hid_proj =
            spec.encoder_hid_proj.map(|(i, o)| Linear::new(p / "encoder_hid_proj", i, o));
        let down_blocks =
            spec.down.iter().enumerate().map(|(i, b)| DownBlock::new(&(p / "down_blocks") / i, b, &layer)).collect();
        let mid_block = spec.mid.as_ref().map(|m| MidBlock::new(p / "mid_block", m, &layer));
        let up_blocks = spec.up.iter().enumerate().map(|(i, b)| UpBlock::new(&(p / "up_blocks") / i, b, &layer)).collect();
        Ok(Self {
            conv_in: conv("conv_in", config.in_channels, first, config.conv_in_kernel),
            time_embedding,
            class_embedding,
            add_embedding,
            encoder_hid_proj,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(p / "conv_norm_out", layer.groups, first, layer.eps),
            conv_out: conv("conv_out", first, config.out_channels, config.conv_out_kernel),
            config: config.clone(),
            spec,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The factor by which the input height and width must be divisible.
    pub fn size_multiple(&self) -> i64 {
        1 << (self.spec.down.len() - 1)
    }

    /// Checks shapes and kinds so that a bad call is an error, not a libtorch abort.
    fn check(&self, input: &UNetInput<'_>) -> Result<i64> {
        let s = input.sample.size();
        let m = self.size_multiple();
        if s.len() != 4 || s[1] != self.config.in_channels || s[2] % m != 0 || s[3] % m != 0 || s[2] == 0 || s[3] == 0 {
            return Err(NnError::input(
                "sample",
                format!("shape {s:?}; expected [B, {}, H, W] with H and W positive multiples of {m}", self.config.in_channels),
            ));
        }
        let b = s[0];
        let t = input.timesteps.size();
        if !(t.is_empty() || t == [b]) {
            return Err(NnError::input("timesteps", format!("shape {t:?}; expected [] or [{b}]")));
        }
        let e = input.encoder_hidden_states.size();
        let width = self.spec.encoder_hid_proj.map_or_else(|| self.spec.down[0].cross_attention_dim, |(i, _)| i);
        if e.len() != 3 || e[0] != b || e[2] != width || e[1] == 0 {
            return Err(NnError::input("encoder_hidden_states", format!("shape {e:?}; expected [{b}, L, {width}]")));
        }
        match (input.class_labels, &self.class_embedding) {
            (None, Some(_)) => return Err(NnError::input("class_labels", "required by this model (it has a class_embed_type)")),
            (Some(_), None) => return Err(NnError::input("class_labels", "given, but the model has no class embedding")),
            (Some(c), Some(ClassEmbed::Timestep(_))) if !(c.size().is_empty() || c.size() == [b]) => {
                return Err(NnError::input("class_labels", format!("shape {:?}; expected [] or [{b}]", c.size())))
            }
            (Some(c), Some(ClassEmbed::Identity)) if c.size() != [b, self.spec.time_embed_dim] => {
                return Err(NnError::input("class_labels", format!("shape {:?}; expected [{b}, {}]", c.size(), self.spec.time_embed_dim)))
            }
            _ => {}
        }
        if let Some(m) = input.text_mask {
            if m.size() != [b, e[1]] {
                return Err(NnError::input("text_mask", format!("shape {:?}; expected [{b}, {}]", m.size(), e[1])));
            }
        }
        Ok(b)
    }

    /// What the pooled-text embedding (`addition_embed_type: "text"`) adds to
    /// the time embedding for these encoder states, if the model has one:
    /// what a derived model that pools its text otherwise (unCLIP's decoder)
    /// is fitted to reproduce.
    pub fn text_time_embedding(&self, encoder_hidden_states: &Tensor) -> Option<Tensor> {
        self.add_embedding.as_ref().map(|add| add.forward(encoder_hidden_states))
    }

    /// Inference forward pass (no dropout).
    pub fn forward(&self, input: &UNetInput<'_>) -> Result<Tensor> {
        self.forward_t(input, false)
    }

    /// The forward pass; `train` enables dropout.
    pub fn forward_t(&self, input: &UNetInput<'_>, train: bool) -> Result<Tensor> {
        self.forward_probed(input, train, None)
    }

    /// [`Self::forward_t`] that also records every text-attending layer's
    /// attention on the text tokens into `maps` (for grounding losses).
    pub fn forward_probed(&self, input: &UNetInput<'_>, train: bool, maps: Option<&AttentionMaps>) -> Result<Tensor> {
        let b = self.check(input)?;
        let kind = input.sample.kind();
        let cfg = &self.config;
        let sinusoid = |t: &Tensor| {
            let t = t.to_device(input.sample.device()).expand([b], false);
            timestep_embedding(&t, self.spec.time_channels, cfg.flip_sin_to_cos, cfg.freq_shift).to_kind(kind)
        };
        // 1. Time embedding, plus the SR noise level and the pooled text.
        let mut emb = self.time_embedding.forward(&sinusoid(input.timesteps));
        if let (Some(class_embedding), Some(labels)) = (&self.class_embedding, input.class_labels) {
            let class_emb = match class_embedding {
                ClassEmbed::Timestep(embedding) => embedding.forward(&sinusoid(labels)),
                ClassEmbed::Identity => labels.to_kind(kind),
            };
            emb = if self.spec.class_embeddings_concat { Tensor::cat(&[emb, class_emb], -1) } else { emb + class_emb };
        }
        if let Some(add) = &self.add_embedding {
            emb += add.forward(input.encoder_hidden_states);
        }
        if let Some(act) = self.spec.time_embedding_act {
            emb = act.forward(&emb);
        }
        // 2. Text tokens projected to the attention width.
        let text = match &self.encoder_hid_proj {
            Some(proj) => input.encoder_hidden_states.apply_linear(proj),
            None => input.encoder_hidden_states.shallow_clone(),
        };
        // diffusers' additive form: 0 where a token counts, −10000 where it is padding.
        let text_bias = input.text_mask.map(|m| (m.to_kind(kind).neg() + 1.0) * -10000.0);
        let cond = Conditioning { temb: &emb, text: &text, text_bias: text_bias.as_ref(), train, maps };
        // 3. Down path, keeping every intermediate for the skips.
        let sample = if cfg.center_input_sample { input.sample * 2.0 - 1.0 } else { input.sample.shallow_clone() };
        let mut h = sample.apply(&self.conv_in);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &cond, &mut skips);
        }
        // 4. Middle.
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &cond);
        }
        // 5. Up path, consuming the skips newest first.
        for block in &self.up_blocks {
            h = block.forward(&h, &cond, &mut skips);
        }
        // 6. Output head.
        Ok(self.spec.layer.act.forward(&h.apply(&self.conv_norm_out)).apply(&self.conv_out))
    }
}

/// A UNet with the `VarStore` that owns its weights.
#[derive(Debug)]
pub struct LoadedUNet {
    pub vs: nn::VarStore,
    pub model: UNet2DConditionModel,
}

impl LoadedUNet {
    /// A randomly initialised model on the CPU in f32.
    pub fn random(config: &UNetConfig) -> Result<Self> {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = UNet2DConditionModel::new(&vs.root(), config)?;
        Ok(Self { vs, model })
    }

    /// Loads a diffusers-layout directory (`config.json` and
    /// `diffusion_pytorch_model.safetensors`, or its shards), then moves it to
    /// `device` in `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = UNetConfig::from_dir(dir)?;
        let (vs, model) = weights::load_frozen(dir, WEIGHTS_STEM, device, kind, |p| UNet2DConditionModel::new(p, &config))?;
        Ok(Self { vs, model })
    }

    /// Writes `config.json` and the weights (in `kind`) so that diffusers'
    /// `UNet2DConditionModel.from_pretrained(dir)` loads them.
    pub fn save(&self, dir: &Path, kind: Kind) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| NnError::io(dir, e))?;
        let config = dir.join("config.json");
        std::fs::write(&config, self.model.config().to_json()).map_err(|e| NnError::io(&config, e))?;
        weights::save(&self.vs, &dir.join(format!("{WEIGHTS_STEM}.safetensors")), kind)
    }

    /// Makes the weights trainable again (loading freezes them for inference):
    /// resuming a training run from a checkpoint.
    pub fn unfreeze(&mut self) {
        self.vs.unfreeze();
    }

    /// The kind the weights are in. (`VarStore::kind` is not updated by
    /// `VarStore::half`, so ask a weight.)
    pub fn kind(&self) -> Kind {
        self.model.conv_in.inner.ws.kind()
    }

    /// The number of parameters.
    pub fn parameter_count(&self) -> i64 {
        self.vs.variables().values().map(Tensor::numel).sum::<usize>() as i64
    }
}
