//! The noised CLIP: an image tower that reads a noised image x_t and its
//! timestep t, a text tower that projects the frozen text encoder's sentence
//! embedding, and CLIP's learnable temperature.
//!
//! Image tower (CLIP's contrastive image encoder, Radford et al. 2021, with
//! GLIDE's noise conditioning, Nichol et al. 2022 §2.3–2.4): a 3×3 stem, then
//! per resolution level ADM ResNet blocks whose GroupNorms are modulated by
//! the timestep embedding (AdaGN, `GroupNorm(h)·(1 + scale) + shift`,
//! Dhariwal & Nichol 2021 §3), 2×2 average pooling between levels, a final
//! GroupNorm + SiLU, global average pooling and a linear projection to the
//! joint embedding. The blocks are the UNet's own `ResnetBlock2D` in its
//! scale-shift mode, so the tower sees t exactly as the denoiser does.
//!
//! Text tower: a linear projection of the masked mean of the encoder's last
//! hidden state ([`crate::nn::text::mean_pool`]), which for all-MiniLM-L6-v2
//! is its sentence embedding. The encoder stays frozen: the shapes domain has
//! a tiny vocabulary, and the cascade's UNets are conditioned on the same
//! encoder, so guidance speaks its language.
//!
//! Every layer is one of `nn::layers`' batch-invariant ones, so a sample's
//! embedding is the same bits alone or in a batch (guidance then does not
//! change an image with the requests it is batched with).

use std::path::Path;

use tch::{nn, Device, Kind, Tensor};

use super::config::NoisedClipConfig;
use crate::nn::error::{NnError, Result};
use crate::nn::layers::{Activation, ApplyLinear, Conv2d, GroupNorm, Linear};
use crate::nn::unet::config::{LayerSettings, TimeScaleShift};
use crate::nn::unet::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::nn::unet::resnet::{Resample, ResnetBlock2D, ResnetShape};
use crate::nn::weights;

/// The weights file of a model folder: `model.safetensors`.
pub const WEIGHTS_STEM: &str = "model";

/// CLIP's initial temperature 0.07, stored as the log of its inverse.
pub const LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778_4; // ln(1 / 0.07)

/// CLIP clips the logit scale at 100 so that training stays stable.
pub const LOGIT_SCALE_MAX: f64 = 100.0;

const GROUP_NORM_EPS: f64 = 1e-5;

#[derive(Debug)]
struct ImageTower {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    /// One list of blocks per resolution level.
    levels: Vec<Vec<ResnetBlock2D>>,
    norm_out: GroupNorm,
    proj: Linear,
}

impl ImageTower {
    fn new(p: nn::Path, config: &NoisedClipConfig) -> Self {
        let channels = &config.block_out_channels;
        let first = channels[0];
        let temb = config.time_embed_dim();
        let settings = LayerSettings {
            act: Activation::Silu,
            groups: config.norm_num_groups,
            eps: GROUP_NORM_EPS,
            temb_channels: temb,
            time_scale_shift: TimeScaleShift::ScaleShift,
            skip_time_act: false,
            dropout: 0.0,
            cross_attention_norm: false,
        };
        let mut inputs = first;
        let levels = channels
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                (0..config.layers_per_block)
                    .map(|j| {
                        let shape = ResnetShape { in_channels: inputs, out_channels: out, resample: Resample::None, output_scale_factor: 1.0 };
                        inputs = out;
                        ResnetBlock2D::new(&p / "levels" / i / j, shape, &settings)
                    })
                    .collect()
            })
            .collect();
        let last = *channels.last().expect("validated: at least one level");
        Self {
            conv_in: Conv2d::new(&p / "conv_in", 3, first, 3),
            time_embedding: TimestepEmbedding::new(&p / "time_embedding", first, temb, Activation::Silu, None),
            levels,
            norm_out: GroupNorm::new(&p / "norm_out", config.norm_num_groups, last, GROUP_NORM_EPS),
            proj: Linear::new(&p / "proj", last, config.embed_dim),
        }
    }

    /// `[B, 3, S, S]`, `[B]` → `[B, embed_dim]`, not yet normalised.
    fn forward(&self, x: &Tensor, t: &Tensor) -> Tensor {
        // 1. The timestep: sinusoids (diffusers' convention, cos first) → MLP.
        let first = self.conv_in.inner.ws.size()[0];
        let emb = self.time_embedding.forward(&timestep_embedding(t, first, true, 0.0).to_kind(x.kind()));
        // 2. The levels, halving the resolution between them.
        let mut h = x.apply(&self.conv_in);
        for (i, blocks) in self.levels.iter().enumerate() {
            if i > 0 {
                h = h.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None);
            }
            for block in blocks {
                h = block.forward(&h, &emb, false);
            }
        }
        // 3. Global average pooling and the projection.
        let h = h.apply(&self.norm_out).silu();
        h.mean_dim([2i64, 3].as_slice(), false, h.kind()).apply_linear(&self.proj)
    }
}

/// The model: both towers and the temperature.
#[derive(Debug)]
pub struct NoisedClip {
    config: NoisedClipConfig,
    image: ImageTower,
    text_proj: Linear,
    /// ln of the inverse temperature (a 0-dimensional variable).
    logit_scale: Tensor,
}

/// Rows scaled to unit L2 norm (a zero row stays zero).
pub(crate) fn l2_normalise(x: &Tensor) -> Tensor {
    x / x.square().sum_dim_intlist([-1i64].as_slice(), true, x.kind()).sqrt().clamp_min(1e-12)
}

impl NoisedClip {
    /// Builds the variables under `p` (randomly initialised).
    pub fn new(p: &nn::Path, config: &NoisedClipConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            image: ImageTower::new(p / "image", config),
            text_proj: Linear::new(p / "text_proj", config.text_hidden_size, config.embed_dim),
            logit_scale: p.var("logit_scale", &[], nn::Init::Const(LOGIT_SCALE_INIT)),
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &NoisedClipConfig {
        &self.config
    }

    /// The embeddings of clean images `[B, 3, S, S]` in [-1, 1] (t = 0, as
    /// unCLIP's decoder reads them), without gradients: `[B, embed_dim]`.
    pub fn clean_image_embeds(&self, images: &Tensor) -> Result<Tensor> {
        let images = images.to_kind(Kind::Float);
        let t = Tensor::zeros([images.size()[0]], (Kind::Int64, images.device()));
        tch::no_grad(|| self.image_embeds(&images, &t))
    }

    /// The embeddings of noised images `x_t` `[B, 3, S, S]` (in [-1, 1] at
    /// t = 0) at timesteps `t` `[B]` (integers or fractions in 0..T):
    /// `[B, embed_dim]`, each row of unit norm.
    pub fn image_embeds(&self, x_t: &Tensor, t: &Tensor) -> Result<Tensor> {
        let s = self.config.image_size;
        let size = x_t.size();
        if size.len() != 4 || size[1..] != [3, s, s] {
            return Err(NnError::input("x_t", format!("shape {size:?}; expected [B, 3, {s}, {s}]")));
        }
        if t.size() != [size[0]] {
            return Err(NnError::input("t", format!("shape {:?}; expected [{}]", t.size(), size[0])));
        }
        let last = self.config.num_train_timesteps as f64;
        if size[0] > 0 {
            let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
            if lo < 0.0 || hi >= last {
                return Err(NnError::input("t", format!("values {lo}..={hi} outside 0..{last}")));
            }
        }
        Ok(l2_normalise(&self.image.forward(x_t, t)))
    }

    /// The embeddings of pooled text states `[B, text_hidden_size]` (see
    /// [`crate::nn::text::mean_pool`]): `[B, embed_dim]`, each row of unit norm.
    pub fn text_embeds(&self, pooled: &Tensor) -> Result<Tensor> {
        let h = self.config.text_hidden_size;
        if pooled.dim() != 2 || pooled.size()[1] != h {
            return Err(NnError::input("pooled", format!("shape {:?}; expected [B, {h}]", pooled.size())));
        }
        Ok(l2_normalise(&pooled.apply_linear(&self.text_proj)))
    }

    /// The text tower's projection applied to each token state `[B, L, H]`,
    /// unnormalised: `[B, L, D]`. The projection is affine, so the tokens'
    /// masked mean is the unnormalised text embedding; unCLIP's decoder reads
    /// them as its text tokens, as Karlo's reads CLIP's token states.
    pub fn text_token_states(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = self.config.text_hidden_size;
        if hidden.dim() != 3 || hidden.size()[2] != h {
            return Err(NnError::input("hidden", format!("shape {:?}; expected [B, L, {h}]", hidden.size())));
        }
        Ok(hidden.apply_linear(&self.text_proj))
    }

    /// exp of the learned log-scale, clipped at [`LOGIT_SCALE_MAX`].
    pub fn logit_scale(&self) -> Tensor {
        self.logit_scale.exp().clamp_max(LOGIT_SCALE_MAX)
    }

    /// The scaled cosine similarities `[B_images, B_texts]` of unit-norm
    /// embeddings, CLIP's logits.
    pub fn logits(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Tensor {
        image_embeds.matmul(&text_embeds.tr()) * self.logit_scale()
    }
}

/// A noised CLIP with the `VarStore` that owns its weights; a folder holds
/// `config.json` and `model.safetensors`.
#[derive(Debug)]
pub struct LoadedNoisedClip {
    pub vs: nn::VarStore,
    pub model: NoisedClip,
}

impl LoadedNoisedClip {
    /// A randomly initialised model on the CPU (seed libtorch first for a
    /// reproducible start).
    pub fn random(config: &NoisedClipConfig) -> Result<Self> {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = NoisedClip::new(&vs.root(), config)?;
        Ok(Self { vs, model })
    }

    /// Loads a model folder (strictly: every tensor by name and shape) onto
    /// `device`, frozen, in f32.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let config = NoisedClipConfig::from_dir(dir)?;
        let (vs, model) = weights::load_frozen(dir, WEIGHTS_STEM, device, Kind::Float, |p| NoisedClip::new(p, &config))?;
        Ok(Self { vs, model })
    }

    /// Writes `config.json` and `model.safetensors` (f32, so a saved model
    /// loads bit-identical).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| NnError::io(dir, e))?;
        let config = dir.join("config.json");
        std::fs::write(&config, self.model.config.to_json()).map_err(|e| NnError::io(&config, e))?;
        weights::save(&self.vs, &dir.join(format!("{WEIGHTS_STEM}.safetensors")), Kind::Float)
    }

    /// Makes the weights trainable again (loading freezes them): resuming.
    pub fn unfreeze(&mut self) {
        self.vs.unfreeze();
    }

    pub fn parameter_count(&self) -> i64 {
        self.vs.variables().values().map(Tensor::numel).sum::<usize>() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NoisedClipConfig {
        NoisedClipConfig {
            image_size: 16,
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            embed_dim: 12,
            text_hidden_size: 10,
            num_train_timesteps: 1000,
            norm_num_groups: 4,
        }
    }

    fn inputs(b: i64) -> (Tensor, Tensor) {
        let opts = (Kind::Float, Device::Cpu);
        let x = Tensor::rand([b, 3, 16, 16], opts) * 2.0 - 1.0;
        let t = Tensor::from_slice(&[0i64, 250, 500, 999][..b as usize]);
        (x, t)
    }

    #[test]
    fn embeddings_have_their_shapes_and_unit_norm() {
        tch::manual_seed(1);
        let clip = LoadedNoisedClip::random(&config()).unwrap();
        let (x, t) = inputs(3);
        let image = clip.model.image_embeds(&x, &t).unwrap();
        let text = clip.model.text_embeds(&Tensor::randn([4, 10], (Kind::Float, Device::Cpu))).unwrap();
        assert_eq!((image.size(), text.size()), (vec![3, 12], vec![4, 12]));
        for e in [&image, &text] {
            let norms = e.square().sum_dim_intlist([1i64].as_slice(), false, Kind::Float).sqrt();
            assert!(norms.allclose(&norms.ones_like(), 1e-5, 1e-5, false), "{norms}");
        }
        let logits = clip.model.logits(&image, &text);
        assert_eq!(logits.size(), [3, 4]);
        // At initialisation the scale is 1/0.07 and cosines are within ±1.
        assert!((clip.model.logit_scale().double_value(&[]) - 1.0 / 0.07).abs() < 1e-3);
        assert!(logits.abs().max().double_value(&[]) <= 1.0 / 0.07 + 1e-3);
        // The timestep matters.
        let other = clip.model.image_embeds(&x, &Tensor::from_slice(&[900i64, 900, 900])).unwrap();
        assert!(!other.allclose(&image, 1e-4, 1e-4, false));
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_argument() {
        let clip = LoadedNoisedClip::random(&config()).unwrap();
        let (x, t) = inputs(2);
        let msg = |r: Result<Tensor>| r.unwrap_err().to_string();
        assert!(msg(clip.model.image_embeds(&x.narrow(2, 0, 8), &t)).contains("x_t"));
        assert!(msg(clip.model.image_embeds(&x, &Tensor::from_slice(&[0i64]))).contains("`t`"));
        assert!(msg(clip.model.image_embeds(&x, &Tensor::from_slice(&[0i64, 1000]))).contains("outside"));
        assert!(msg(clip.model.text_embeds(&Tensor::zeros([2, 9], (Kind::Float, Device::Cpu)))).contains("pooled"));
    }

    #[test]
    fn a_sample_embeds_the_same_alone_and_in_a_batch() {
        tch::manual_seed(2);
        let clip = LoadedNoisedClip::random(&config()).unwrap();
        let (x, t) = inputs(4);
        let batched = clip.model.image_embeds(&x, &t).unwrap();
        for i in 0..4 {
            // Twice: the first call tries a batch of one both ways, the second uses the verdict.
            for _ in 0..2 {
                let alone = clip.model.image_embeds(&x.narrow(0, i, 1), &t.narrow(0, i, 1)).unwrap();
                assert!(alone.get(0).equal(&batched.get(i)), "sample {i}");
            }
            let pair = clip.model.image_embeds(&x.narrow(0, i.min(2), 2), &t.narrow(0, i.min(2), 2)).unwrap();
            assert!(pair.get(i - i.min(2)).equal(&batched.get(i)), "sample {i} in a pair");
        }
        let pooled = Tensor::randn([3, 10], (Kind::Float, Device::Cpu));
        let texts = clip.model.text_embeds(&pooled).unwrap();
        assert!(clip.model.text_embeds(&pooled.narrow(0, 1, 1)).unwrap().get(0).equal(&texts.get(1)));
    }

    #[test]
    fn save_and_load_round_trip_bit_identically() {
        tch::manual_seed(3);
        let dir = std::env::temp_dir().join(format!("diffusiond-noised-clip-{}", std::process::id()));
        let clip = LoadedNoisedClip::random(&config()).unwrap();
        clip.save(&dir).unwrap();
        let loaded = LoadedNoisedClip::load(&dir, Device::Cpu).unwrap();
        assert_eq!(loaded.model.config(), clip.model.config());
        let (a, b) = (clip.vs.variables(), loaded.vs.variables());
        assert_eq!(a.len(), b.len());
        for (name, value) in &a {
            assert!(value.equal(&b[name]), "{name} changed");
        }
        let (x, t) = inputs(2);
        assert!(clip.model.image_embeds(&x, &t).unwrap().equal(&loaded.model.image_embeds(&x, &t).unwrap()));
        // Another architecture does not load these weights.
        let mut wider = config();
        wider.embed_dim = 16;
        std::fs::write(dir.join("config.json"), wider.to_json()).unwrap();
        let err = LoadedNoisedClip::load(&dir, Device::Cpu).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("wrong shape"), "{err}");
    }
}
