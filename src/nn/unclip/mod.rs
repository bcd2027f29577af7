//! DALL-E 2's unCLIP models (Ramesh et al. 2022, "Hierarchical Text-Conditional
//! Image Generation with CLIP Latents"), in diffusers' layout as Karlo ships them.
//!
//! | module | owns |
//! |---|---|
//! | `config` | `PriorTransformer` and `UnCLIPTextProjModel` config files |
//! | `prior` | the prior: a causal transformer that denoises a CLIP image embedding given the caption (§2.2) |
//! | `text_proj` | the decoder's conditioning: the image embedding added to the timestep embedding and as extra context tokens (§2.1) |
//!
//! The decoder itself is [`crate::nn::unet::UNet2DConditionModel`]; its
//! sampler is the DDPM of [`crate::diffusion`], which reads Karlo's
//! `UnCLIPScheduler` files.

pub mod config;
pub mod prior;
pub mod text_proj;

pub use config::{PriorConfig, TextProjConfig};
pub use prior::{LoadedPrior, PriorInput, PriorTransformer};
pub use text_proj::{LoadedTextProj, TextProjOutput, UnCLIPTextProjModel};
