//! `multipart/form-data` bodies (OpenAI's image edit and variation routes): every
//! way such a body can be wrong becomes an [`ApiError`] naming the field — a
//! non-multipart content type (415), a body past the limit (413), a malformed
//! body, an unknown, repeated or missing field, a value that does not parse (422).

use std::collections::HashMap;

use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};

use super::errors::ApiError;
use super::state::AppState;

/// The parts of a form, by name (`image[]`, as SDKs send lists, counts as `image`).
#[derive(Debug, Default)]
pub struct Form {
    parts: HashMap<String, Vec<u8>>,
}

impl FromRequest<AppState> for Form {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let expected = "multipart/form-data";
        let is_multipart = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case(expected));
        if !is_multipart {
            return Err(ApiError::UnsupportedMediaType { expected });
        }
        let limit = state.config.max_body_bytes;
        let mut multipart = Multipart::from_request(request, state).await.map_err(|e| ApiError::invalid("body", e.body_text()))?;
        let mut form = Form::default();
        loop {
            let field = match multipart.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(ApiError::PayloadTooLarge { limit }),
                Err(e) => return Err(ApiError::invalid("body", e.body_text())),
            };
            let name = field.name().unwrap_or_default().trim_end_matches("[]").to_owned();
            if name.is_empty() {
                return Err(ApiError::invalid("body", "a form part has no name"));
            }
            let bytes = field.bytes().await.map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge { limit },
                _ => ApiError::invalid(&name, e.body_text()),
            })?;
            if form.parts.insert(name.clone(), bytes.to_vec()).is_some() {
                return Err(ApiError::invalid(&name, "is given more than once (one image per request)"));
            }
        }
        Ok(form)
    }
}

impl Form {
    /// Fails on the first part not in `allowed`.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        let mut names: Vec<&String> = self.parts.keys().collect();
        names.sort();
        match names.into_iter().find(|n| !allowed.contains(&n.as_str())) {
            Some(unknown) => Err(ApiError::invalid(unknown, format!("unknown field; expected one of {}", allowed.join(", ")))),
            None => Ok(()),
        }
    }

    pub fn file(&self, name: &str) -> Option<&[u8]> {
        self.parts.get(name).map(Vec::as_slice)
    }

    pub fn required_file(&self, name: &str) -> Result<&[u8], ApiError> {
        self.file(name).ok_or_else(|| ApiError::invalid(name, "is required"))
    }

    pub fn text(&self, name: &str) -> Result<Option<String>, ApiError> {
        self.parts
            .get(name)
            .map(|b| String::from_utf8(b.clone()).map_err(|_| ApiError::invalid(name, "is not UTF-8 text")))
            .transpose()
    }

    /// A text part parsed as `T` (numbers, enums by their wire name).
    pub fn parse<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiError> {
        match self.text(name)? {
            None => Ok(None),
            Some(text) => text.trim().parse().map(Some).map_err(|_| ApiError::invalid(name, format!("`{text}` is not a valid value"))),
        }
    }
}
