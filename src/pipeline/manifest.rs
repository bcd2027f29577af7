//! `cascade.json`: what a cascade directory holds and how to run it.
//!
//! A cascade is one directory with this manifest and one folder per stage. The
//! manifest names the text encoder (and optionally a separate tokenizer folder),
//! then the stages in order, each with its default sampling settings. A stage
//! folder is what diffusers' `IFPipeline` / `IFSuperResolutionPipeline` load:
//! `unet/` (config.json + safetensors), `scheduler/scheduler_config.json` and,
//! for super-resolution stages, `image_noising_scheduler/scheduler_config.json`.
//! Paths are relative to the manifest, so a manifest can describe a
//! DeepFloyd-IF-style download in place (`"path": "../IF-II-L-v1.0"`).
//!
//! ```json
//! {
//!   "name": "shapes",
//!   "text_encoder": {"path": "../all-MiniLM-L6-v2", "max_length": 32},
//!   "stages": [
//!     {"name": "base", "path": "base", "sampler": "ddpm", "steps": 50, "guidance_scale": 4.0},
//!     {"name": "sr64", "path": "sr64", "sampler": "ddpm", "steps": 25, "guidance_scale": 4.0, "noise_level": 250, "strength": 0.4}
//!   ],
//!   "clip": {"path": "../clip"}
//! }
//! ```
//!
//! A cascade may be DALL-E 2's unCLIP instead: its first stage has
//! `"kind": "prior"` (a folder with `prior/` and `prior_scheduler/`), its
//! second `"kind": "decoder"` (`decoder/`, `text_proj/`, `decoder_scheduler/`),
//! and super-resolution stages may follow. Both read the caption through the
//! manifest's `clip`, which an unCLIP cascade therefore needs.
//!
//! `clip` (optional) names a noised CLIP folder (`diffusiond train-clip`'s
//! export) that lets requests add GLIDE's CLIP guidance to the base stage; it
//! must read the same text encoder as the stages.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{PipelineError, Result};

pub const MANIFEST_FILE: &str = "cascade.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Shown by `info`, written into every PNG.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub text_encoder: TextEncoderEntry,
    pub stages: Vec<StageEntry>,
    /// A noised CLIP for CLIP guidance of the base stage (GLIDE §2.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<ClipEntry>,
}

/// The noised CLIP a cascade may guide its base stage with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipEntry {
    /// The model folder (`config.json`, `model.safetensors`, `inputs.json`),
    /// relative to the manifest.
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextEncoderEntry {
    /// A transformers model directory (config.json, safetensors).
    pub path: PathBuf,
    /// The folder with `tokenizer.json`, when not the encoder's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// Tokens per prompt (prompts are padded and truncated to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

/// One stage and its defaults; a request may override each default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageEntry {
    pub name: String,
    pub path: PathBuf,
    /// `prior` or `decoder` for unCLIP's first two stages (their folders are
    /// `UnCLIPPipeline`'s); absent for a base or super-resolution stage,
    /// which its UNet's input channels tell apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<StageEntryKind>,
    /// `ddpm`, `ddim` or `dpmsolver++`.
    pub sampler: String,
    pub steps: usize,
    pub guidance_scale: f32,
    #[serde(default)]
    pub eta: f64,
    /// When this stage runs DDIM, derive ε̂ from the clipped or thresholded
    /// x̂_0 instead of the model's own (GLIDE's choice; diffusers'
    /// `use_clipped_model_output`, off there by default). Without it a step
    /// combines a clipped x̂_0 with the unclipped ε̂ it came from, and
    /// whatever thresholding removed returns through ε̂: under guidance,
    /// where x̂_0 overshoots, images drift off the prompt.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub use_clipped_model_output: bool,
    /// The base stage: layout guidance's default scale (0 or absent: none;
    /// see `pipeline::layout_guidance`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub layout_guidance_scale: f32,
    /// Super-resolution stages: the noise-augmentation timestep of the
    /// conditioning image (Imagen's noise-conditioning augmentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_level: Option<i64>,
    /// Super-resolution stages: start from the previous stage's output,
    /// upsampled bicubically and noised to this share of the schedule,
    /// instead of from pure noise (diffusers' `IFImg2ImgSuperResolutionPipeline`
    /// with that upsampled image as `original_image`); absent: 1, pure noise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
}

/// The stage kinds a manifest names explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageEntryKind {
    Prior,
    Decoder,
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

impl Manifest {
    /// Reads `dir/cascade.json`; errors name the file.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&file).map_err(|e| PipelineError::model(&file, e.to_string()))?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| PipelineError::model(&file, e.to_string()))?;
        if manifest.stages.is_empty() {
            return Err(PipelineError::model(&file, "`stages` is empty"));
        }
        for (i, stage) in manifest.stages.iter().enumerate() {
            if manifest.stages[..i].iter().any(|s| s.name == stage.name) {
                return Err(PipelineError::model(&file, format!("stage name `{}` is used twice", stage.name)));
            }
        }
        Ok(manifest)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let file = dir.join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).expect("manifest serialises") + "\n";
        std::fs::write(&file, text).map_err(|e| PipelineError::model(&file, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_empty_stages_are_rejected() {
        let dir = std::env::temp_dir().join(format!("diffusiond-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |v: serde_json::Value| std::fs::write(dir.join(MANIFEST_FILE), v.to_string()).unwrap();
        let stage = serde_json::json!({"name": "base", "path": "base", "sampler": "ddpm", "steps": 10, "guidance_scale": 4.0});
        write(serde_json::json!({"name": "m", "text_encoder": {"path": "enc"}, "stages": [stage]}));
        assert_eq!(Manifest::from_dir(&dir).unwrap().stages[0].steps, 10);
        let clipped = serde_json::json!({"name": "base", "path": "base", "sampler": "ddim", "steps": 10, "guidance_scale": 4.0, "use_clipped_model_output": true});
        write(serde_json::json!({"name": "m", "text_encoder": {"path": "enc"}, "stages": [stage, clipped.clone()]}));
        let read = Manifest::from_dir(&dir);
        assert!(read.unwrap_err().to_string().contains("used twice"));
        let clipped = serde_json::json!({"name": "b2", "path": "base", "sampler": "ddim", "steps": 10, "guidance_scale": 4.0, "use_clipped_model_output": true});
        write(serde_json::json!({"name": "m", "text_encoder": {"path": "enc"}, "stages": [stage, clipped]}));
        let read = Manifest::from_dir(&dir).unwrap();
        assert_eq!(read.stages.iter().map(|s| s.use_clipped_model_output).collect::<Vec<_>>(), [false, true]);
        // Written back, the flag appears only where it is set.
        read.write(&dir).unwrap();
        let text = std::fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
        assert_eq!(text.matches("use_clipped_model_output").count(), 1);
        write(serde_json::json!({"name": "m", "text_encoder": {"path": "enc"}, "stages": [], "extra": 1}));
        assert!(Manifest::from_dir(&dir).unwrap_err().to_string().contains("extra"));
        write(serde_json::json!({"name": "m", "text_encoder": {"path": "enc"}, "stages": []}));
        assert!(Manifest::from_dir(&dir).unwrap_err().to_string().contains("empty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
