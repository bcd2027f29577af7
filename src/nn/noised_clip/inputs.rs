//! `inputs.json` of a noised CLIP folder: what the model reads besides its
//! weights. The text tower projects the pooled state of one particular frozen
//! encoder (at one number of tokens), and the timestep input means the ᾱ_t of
//! one particular noise schedule; neither can be swapped without retraining,
//! so the folder names them. It also records the dataset seed the model was
//! trained on, so that evaluation can keep off it.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::nn::error::{NnError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelInputs {
    /// The text encoder folder (transformers layout). In the file, a relative
    /// path is relative to the model folder, so folders can move together.
    pub text_encoder: PathBuf,
    /// Tokens per prompt the encoder was run with.
    pub max_length: usize,
    /// The diffusers scheduler config whose noise schedule t refers to.
    pub scheduler: serde_json::Value,
    /// The seed of the training dataset.
    pub train_seed: u64,
}

impl ModelInputs {
    pub const FILE: &'static str = "inputs.json";

    /// Reads `dir/inputs.json`, resolving the encoder path against `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let file = dir.join(Self::FILE);
        let text = std::fs::read_to_string(&file).map_err(|e| NnError::io(&file, e))?;
        let mut inputs: Self = serde_json::from_str(&text).map_err(|source| NnError::Json { file: file.display().to_string(), source })?;
        if inputs.text_encoder.is_relative() {
            inputs.text_encoder = dir.join(&inputs.text_encoder);
        }
        Ok(inputs)
    }

    /// Writes `dir/inputs.json`, with the encoder path relative to `dir`
    /// where both exist.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| NnError::io(dir, e))?;
        let encoder = relative_to(&self.text_encoder, dir).unwrap_or_else(|| self.text_encoder.clone());
        let stored = Self { text_encoder: encoder, ..self.clone() };
        let file = dir.join(Self::FILE);
        let text = serde_json::to_string_pretty(&stored).expect("a plain struct serialises");
        std::fs::write(&file, text).map_err(|e| NnError::io(&file, e))
    }
}

/// `path` as seen from the folder `base` (both made absolute first), or none
/// when either does not exist.
fn relative_to(path: &Path, base: &Path) -> Option<PathBuf> {
    let (path, base) = (std::fs::canonicalize(path).ok()?, std::fs::canonicalize(base).ok()?);
    let (a, b): (Vec<Component>, Vec<Component>) = (path.components().collect(), base.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out: PathBuf = std::iter::repeat_n(Component::ParentDir, b.len() - common).collect();
    out.extend(&a[common..]);
    Some(if out.as_os_str().is_empty() { PathBuf::from(".") } else { out })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoder_path_is_stored_relative_to_the_folder() {
        let root = std::env::temp_dir().join(format!("diffusiond-clip-inputs-{}", std::process::id()));
        let (model, encoder) = (root.join("runs/clip/model"), root.join("models/encoder"));
        std::fs::create_dir_all(&model).unwrap();
        std::fs::create_dir_all(&encoder).unwrap();
        let inputs = ModelInputs { text_encoder: encoder.clone(), max_length: 16, scheduler: serde_json::json!({"beta_schedule": "linear"}), train_seed: 7 };
        inputs.write(&model).unwrap();
        let text = std::fs::read_to_string(model.join(ModelInputs::FILE)).unwrap();
        assert!(text.contains("\"../../../models/encoder\""), "{text}");
        let read = ModelInputs::read(&model).unwrap();
        assert_eq!(std::fs::canonicalize(&read.text_encoder).unwrap(), std::fs::canonicalize(&encoder).unwrap());
        assert_eq!((read.max_length, read.train_seed), (16, 7));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
