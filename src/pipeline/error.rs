//! The pipeline layer's error type: loading a cascade (each error names the file
//! and the problem), validating a request (each names the field and its allowed
//! range) and running it.

use crate::diffusion::DiffusionError;
use crate::nn::NnError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The cascade directory is not usable: a missing file, a bad manifest, a
    /// stage whose shapes do not fit the others.
    #[error("{file}: {reason}")]
    Model { file: String, reason: String },
    /// A request value outside what the cascade supports.
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    /// The caller stopped the generation (a cancelled job, a closed connection).
    #[error("generation cancelled")]
    Cancelled,
    #[error(transparent)]
    Nn(#[from] NnError),
    #[error(transparent)]
    Diffusion(#[from] DiffusionError),
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
    #[error("PNG encoding failed: {0}")]
    Png(String),
}

impl PipelineError {
    pub(crate) fn model(file: impl AsRef<std::path::Path>, reason: impl Into<String>) -> Self {
        Self::Model { file: file.as_ref().display().to_string(), reason: reason.into() }
    }

    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::Invalid { field: field.to_owned(), reason: reason.into() }
    }
}

pub type Result<T> = std::result::Result<T, PipelineError>;
