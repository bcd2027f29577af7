//! Training: the synthetic captioned-shapes dataset our small cascade learns
//! from, and the objective it is trained with.
//!
//! | Module | Owns |
//! |---|---|
//! | [`scene`] | the resolution-free scene: shapes, colours, sizes, objects, background |
//! | [`sdf`] | signed distances of the shapes, for analytic anti-aliasing |
//! | [`render`] | rasterising a scene at any size into images and tensors |
//! | [`claims`] | what a caption asserts (counts, relations) and when it is true |
//! | [`layout`] | sampling a scene together with the description it must satisfy |
//! | [`caption`] | wording a description: templates and synonyms, and where each word is |
//! | [`dataset`] | the seeded, endless, indexable stream of samples and batches |
//! | [`grounding`] | the grounding loss: caption words' attention maps tied to the objects they name |
//! | [`loss`] | ADM's hybrid loss: L_simple (ε or v, optionally Min-SNR-γ weighted) + λ·L_vlb with learned-range variance |
//! | [`optim`] | flat-buffer AdamW with saved moments, warm-up, clipping, EMA, loss scale: exact resume |
//! | [`trainer`] | one training step of a base or super-resolution stage (f32 or fp16 autocast), batches drawn ahead |
//! | [`validate`] | held-out x̂_0 error per noise level, with and without the caption |
//! | `checkpoint` | replacing a run's checkpoint folder atomically |
//! | `steps` | the step loop of the small runs (CLIP, prior): log, checkpoints, time limit |
//! | [`run`] | a stage's training run: config, init weights, loop, time limit, checkpoints, resume, export |
//! | [`contrastive`] | CLIP's symmetric InfoNCE with equal descriptions as each other's positives |
//! | [`clip`] | the noised CLIP's training run (GLIDE): noised batches, steps, checkpoints, resume, export |
//! | [`decoder`] | DALL-E 2's decoder: the base stage reading a CLIP image embedding through `text_proj`, fine-tuned |
//! | [`prior`] | DALL-E 2's diffusion prior in the noised CLIP's embedding space: batches, steps, checkpoints, resume, export |

pub mod caption;
mod checkpoint;
pub mod claims;
pub mod clip;
pub mod contrastive;
pub mod dataset;
pub mod decoder;
pub mod grounding;
pub mod layout;
pub mod loss;
pub mod optim;
pub mod prior;
pub mod trainer;
pub mod render;
pub mod run;
pub mod scene;
mod steps;
pub mod sdf;
pub mod validate;
