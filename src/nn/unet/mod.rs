//! The IF-style conditional UNet (`UNet2DConditionModel`, the subset DeepFloyd IF
//! uses), with diffusers' config format, parameter names and arithmetic.
//!
//! | file | owns |
//! |---|---|
//! | `config` | `config.json` parsing, validation and resolution into per-block specs |
//! | `embeddings` | sinusoidal timesteps, `TimestepEmbedding`, text pooling |
//! | `resnet` | `ResnetBlock2D` (default / AdaGN scale-shift, up/down) |
//! | `attention` | attention with added text keys and values |
//! | `blocks` | down, middle and up blocks |
//! | `model` | the model, its forward pass, loading and saving |
//! | `unet2d` | `UNet2DModel`, the text-free UNet of unCLIP's super-resolution stages |

pub mod attention;
pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod model;
pub mod resnet;
pub mod unet2d;

pub use attention::AttentionMaps;
pub use config::UNetConfig;
pub use model::{LoadedUNet, UNet2DConditionModel, UNetInput, WEIGHTS_STEM};
