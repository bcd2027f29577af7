//! The diffusion layer's error type. Every variant names the configuration field
//! or argument at fault so that callers (the pipeline, the API) can report it.

/// Errors from building schedules and samplers or from stepping them.
#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    /// A scheduler option diffusers knows but diffusiond does not implement.
    #[error("unsupported scheduler option `{field}`: {reason}")]
    Unsupported { field: String, reason: String },
    /// A value outside the range the mathematics allows.
    #[error("invalid value for `{field}`: {reason}")]
    Invalid { field: String, reason: String },
    /// A key that no diffusers scheduler of the supported classes writes.
    #[error("unknown scheduler option `{field}`")]
    UnknownField { field: String },
    /// The sampler was stepped after its last timestep.
    #[error("sampler already finished its {0} steps")]
    Finished(usize),
    #[error("scheduler config is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("tensor operation failed: {0}")]
    Torch(#[from] tch::TchError),
}

impl DiffusionError {
    pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::Invalid { field: field.to_owned(), reason: reason.into() }
    }

    pub(crate) fn unsupported(field: &str, reason: impl Into<String>) -> Self {
        Self::Unsupported { field: field.to_owned(), reason: reason.into() }
    }
}

pub type Result<T> = std::result::Result<T, DiffusionError>;
