//! A small CLIP of our own for the synthetic shapes domain, in the noised
//! variant GLIDE trained for CLIP guidance.
//!
//! CLIP (Radford et al. 2021, "Learning Transferable Visual Models From
//! Natural Language Supervision") embeds images and captions in one space,
//! trained contrastively so that a render and its caption are nearer than
//! mismatched pairs. GLIDE (Nichol et al. 2022, "GLIDE: Towards Photorealistic
//! Image Generation and Editing with Text-Guided Diffusion Models", §2.4)
//! trains the image encoder on noised images x_t with t as an input, so that
//! its gradient is meaningful along the whole sampling trajectory; a CLIP
//! trained on clean images only is off-distribution for every x_t but the last.
//!
//! | module | owns |
//! |---|---|
//! | `config` | `config.json`: sizes, widths, embedding dim, timesteps; validation |
//! | `model` | the image tower (AdaGN ResNet on x_t, t), the text tower (projection of the pooled frozen encoder), the logit scale; save/load |
//! | `inputs` | `inputs.json`: the text encoder and noise schedule a model folder was trained with |
//!
//! The training loop is [`crate::train::clip`]; zero-shot retrieval is
//! [`crate::eval::retrieval`].

pub mod config;
pub mod inputs;
pub mod model;

pub use config::NoisedClipConfig;
pub use inputs::ModelInputs;
pub use model::{LoadedNoisedClip, NoisedClip};
