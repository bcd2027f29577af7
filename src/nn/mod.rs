//! The neural networks diffusiond runs and trains, in libtorch through `tch`.
//!
//! Architectures and parameter names follow Hugging Face diffusers
//! (`UNet2DConditionModel` as DeepFloyd IF configures it) and transformers
//! (`BertModel`, `T5EncoderModel`, `CLIPTextModelWithProjection`), so checkpoints move between diffusiond and
//! those libraries without conversion.
//!
//! | module | owns |
//! |---|---|
//! | `weights` | strict safetensors loading (single or sharded) and saving |
//! | `device` | the device and precision settings |
//! | `precision` | bfloat16 products inside f32 layers, for training on the CPU |
//! | `config_file` | reading a diffusers `config.json` into a serde struct |
//! | `unet` | the IF-style UNet: config, embeddings, ResNet blocks, attention, up/down blocks |
//! | `text` | tokenizer and frozen text encoders (BERT, T5, CLIP) |
//! | `unclip` | DALL-E 2's prior transformer and the decoder's CLIP-embedding projection |
//! | `noised_clip` | our own small CLIP on noised images (GLIDE), for CLIP and classifier guidance |

mod config_file;
pub mod device;
pub mod error;
pub mod layers;
pub mod noised_clip;
pub mod precision;
pub mod text;
pub mod unclip;
pub mod unet;
pub mod weights;

pub use error::{NnError, Result};
