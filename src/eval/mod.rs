//! Prompt-adherence evaluation in the manner of GenEval (Ghosh, Hajishirzi &
//! Schmidt, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
//! Alignment", NeurIPS 2023 Datasets and Benchmarks): prompts in fixed
//! categories, each image read back by a detector and judged on what its
//! prompt asserts, accuracy per category and their mean.
//!
//! Our domain is closed — known colours, known outlines, a renderer whose
//! geometry we own — so the detector is exact geometry instead of a trained
//! model, and it is validated on our own renders of the same prompts before it
//! is trusted with a model's samples: `diffusiond eval --ground-truth` scores
//! those renders, `diffusiond eval --model DIR [--table steps|guidance]` a
//! cascade's samples.
//!
//! | Module | Owns |
//! |---|---|
//! | [`detect`] | image → scene: the detector and its shape fitting |
//! | `segment` | the detector's colour segmentation into object regions |
//! | [`suite`] | the seeded prompts per category, their claims and a scene for each |
//! | [`score`] | judging a detected scene against a case; tallies and tables |
//! | [`batch`] | running many prompts through a cascade in shared UNet calls |
//! | [`retrieval`] | a noised CLIP's zero-shot image↔caption retrieval on held-out renders, per noise level |
//! | [`decoder`] | an unCLIP decoder's image-embedding → image fidelity: retrieval and cosine of its drawings against caption-only and unconditional ones |
//! | [`prior`] | a diffusion prior's caption → image-embedding quality: retrieval and cosine against the text embedding alone |

pub mod batch;
pub mod decoder;
pub mod detect;
pub mod prior;
pub mod retrieval;
pub mod score;
mod segment;
pub mod suite;
