//! The cascade pipeline: prompts in, images out, the way GLIDE, Imagen and
//! DeepFloyd IF generate — a frozen text encoder, a guided base stage, then
//! super-resolution stages each conditioned on the previous stage's upsampled,
//! noise-augmented output.
//!
//! | file | owns |
//! |---|---|
//! | `manifest` | `cascade.json`: the encoder, the stages and their defaults |
//! | `stage` | loading one stage folder (IF layout) and checking it |
//! | `request` | raw request settings → validated `GenerationRequest` |
//! | `source` | images a request starts from, noise mixes (variations, interpolation) |
//! | `denoise` | one job's denoising at one stage, a step at a time |
//! | `clip_guidance` | GLIDE's CLIP guidance of the base stage with a noised CLIP |
//! | `classifier_guidance` | ADM's classifier guidance, the noised CLIP as the noisy classifier |
//! | `classifier_labels` | the caption classes a prompt is told apart from |
//! | `prompt_layout` | reading what a prompt names, and where ("… above …") |
//! | `layout_guidance` | guidance of that layout through the base UNet's own attention |
//! | `cascade` | the loaded cascade and the whole generation |
//! | `png` | 8-bit RGB conversion and PNG files with their parameters |
//! | `format` | the delivered file format: PNG, JPEG at a quality, lossless WebP |
//! | `writer` | writing stage folders diffusers and `Cascade::load` both read |
//! | `unclip` | DALL-E 2's unCLIP: CLIP prior, decoder, super-resolution (Karlo's layout) |

pub mod cascade;
pub mod classifier_guidance;
pub mod classifier_labels;
pub mod clip_guidance;
pub mod denoise;
pub mod error;
pub mod format;
pub mod manifest;
pub mod png;
pub mod prompt_layout;
pub mod layout_guidance;
pub mod request;
pub mod source;
pub mod stage;
pub mod unclip;
pub mod writer;

pub use cascade::{Cascade, CascadeInfo, ClipText, GeneratedImage, JobText, LoadOptions, Progress};
pub use classifier_guidance::{ClassifierJob, MAX_CLASSIFIER_GUIDANCE};
pub use clip_guidance::{ClipGuide, ClipJob, MAX_CLIP_GUIDANCE};
pub use error::{PipelineError, Result};
pub use format::{ImageFormat, Output};
pub use manifest::Manifest;
pub use layout_guidance::MAX_LAYOUT_GUIDANCE;
pub use request::{plan, GenerationRequest, RequestSpec, StageOverride, StagePlan};
pub use source::{Mask, NoiseMix, Picture, PictureLimits, Source, SourceSpec};
pub use stage::StageLimits;
