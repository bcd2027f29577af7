//! The network layer's error type. Loading errors name the file and the
//! tensors or config fields at fault, so that start-up failures are actionable.

use std::path::PathBuf;

/// Errors from reading configs and checkpoints, building models and running them.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// A config option diffusers/transformers knows but diffusiond does not implement.
    #[error("{file}: unsupported option `{field}`: {reason}")]
    Unsupported { file: String, field: String, reason: String },
    /// A config value that cannot describe a valid model.
    #[error("{file}: invalid value for `{field}`: {reason}")]
    Invalid { file: String, field: String, reason: String },
    /// The checkpoint does not hold exactly the tensors the model declares.
    #[error("{file}: checkpoint does not match the model: {detail}")]
    Mismatch { file: String, detail: String },
    #[error("{file}: {source}")]
    Io { file: String, source: std::io::Error },
    #[error("{file}: not valid JSON: {source}")]
    Json { file: String, source: serde_json::Error },
    #[error("{file}: not a valid safetensors file: {reason}")]
    Safetensors { file: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A caller passed tensors of the wrong shape or kind.
    #[error("invalid input `{field}`: {reason}")]
    Input { field: String, reason: String },
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
}

impl NnError {
    pub(crate) fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { file: file.into().display().to_string(), source }
    }

    pub(crate) fn input(field: &str, reason: impl Into<String>) -> Self {
        Self::Input { field: field.to_owned(), reason: reason.into() }
    }
}

pub type Result<T> = std::result::Result<T, NnError>;
