//! A diffusers model's `config.json`: the `_class_name` check, the bookkeeping
//! keys (`_diffusers_version`, …) dropped, and errors that name the file.
//! Shared by every diffusers model config (`UNet2DConditionModel`,
//! `UNet2DModel`, unCLIP's prior and text projection).

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::{NnError, Result};

/// Parses a config of diffusers class `class`, dropping its bookkeeping keys.
pub(crate) fn from_json<T: DeserializeOwned>(text: &str, class: &str) -> Result<T> {
    let json = |source| NnError::Json { file: "config.json".into(), source };
    let Value::Object(mut map) = serde_json::from_str(text).map_err(json)? else {
        return Err(invalid("config", "not a JSON object"));
    };
    if let Some(name) = map.get("_class_name").and_then(Value::as_str) {
        if name != class {
            return Err(unsupported("_class_name", format!("`{name}` (expected {class})")));
        }
    }
    map.retain(|k, _| !k.starts_with('_'));
    serde_json::from_value(Value::Object(map)).map_err(json)
}

/// [`from_json`] of `dir/config.json`, its errors naming that file.
pub(crate) fn from_dir<T: DeserializeOwned>(dir: &Path, class: &str) -> Result<T> {
    let file = dir.join("config.json");
    let text = std::fs::read_to_string(&file).map_err(|e| NnError::io(&file, e))?;
    from_json(&text, class).map_err(|e| in_file(e, &file))
}

pub(crate) fn in_file(e: NnError, file: &Path) -> NnError {
    let file = file.display().to_string();
    match e {
        NnError::Unsupported { field, reason, .. } => NnError::Unsupported { file, field, reason },
        NnError::Invalid { field, reason, .. } => NnError::Invalid { file, field, reason },
        NnError::Json { source, .. } => NnError::Json { file, source },
        other => other,
    }
}

/// An invalid value of `field` in a `config.json` (the file is named by [`in_file`]).
pub(crate) fn invalid(field: &str, reason: impl Into<String>) -> NnError {
    NnError::Invalid { file: "config.json".into(), field: field.into(), reason: reason.into() }
}

/// A value of `field` selecting something not implemented.
pub(crate) fn unsupported(field: &str, reason: impl Into<String>) -> NnError {
    NnError::Unsupported { file: "config.json".into(), field: field.into(), reason: reason.into() }
}
