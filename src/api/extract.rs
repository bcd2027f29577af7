//! The JSON body extractor: like `axum::Json`, but every way a body can be
//! wrong becomes an [`ApiError`] with the same shape as all other errors —
//! 415 for a non-JSON content type, 413 past the body limit, and 422 naming the
//! field for malformed JSON, an unknown field, a missing field or a wrong type.
//!
//! Follows axum's `examples/customize-extractor-error` (a wrapper extractor
//! with its own rejection); field paths come from `serde_path_to_error`, which
//! axum's own `Json` uses.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::errors::ApiError;
use super::state::AppState;

/// A JSON request body that rejects with [`ApiError`].
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError::UnsupportedMediaType { expected: "application/json" });
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit: state.config.max_body_bytes }
            } else {
                // The client stopped sending mid-body, or the transport failed.
                ApiError::invalid("body", rejection.body_text())
            }
        })?;
        parse(&bytes).map(Self)
    }
}

/// The `{id}` (and `{index}`) of a job route. Anything unparsable is a job or
/// image that does not exist: 404 in the usual shape, not axum's plain-text 400.
#[derive(Debug, Clone, Copy)]
pub struct JobPath {
    pub id: Uuid,
    /// Present on `/jobs/{id}/images/{index}`.
    pub index: Option<usize>,
}

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let params = RawPathParams::from_request_parts(parts, state).await.map_err(ApiError::internal)?;
        let get = |name: &str| params.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_owned());
        let id = get("id").and_then(|v| Uuid::parse_str(&v).ok()).ok_or(ApiError::NotFound("job"))?;
        let index = match get("index") {
            Some(v) => Some(v.parse().map_err(|_| ApiError::NotFound("image"))?),
            None => None,
        };
        Ok(Self { id, index })
    }
}

/// `application/json`, or any `application/*+json`, with or without parameters.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses `bytes` as `T`; errors name the field (a dotted path, `body` for the whole).
///
/// In two passes: the text to a JSON value (a syntax error, trailing garbage
/// included, is the body's), then the value to `T`. Straight from the text,
/// serde_json reports some wrong types as syntax errors without a path (a
/// number where an enum's string belongs: "expected value").
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| ApiError::invalid("body", format!("malformed JSON: {}", strip_position(&e))))?;
    serde_path_to_error::deserialize(value).map_err(classify)
}

fn classify(error: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    let message = strip_position(&inner);
    if !inner.is_data() {
        return ApiError::invalid("body", format!("malformed JSON: {message}"));
    }
    // A missing field is reported on the enclosing object (an unknown one on
    // itself); the field is the back-quoted name in the message.
    let named = ["unknown field `", "missing field `"].iter().find_map(|prefix| message.strip_prefix(prefix)).and_then(|rest| rest.split('`').next());
    let param = match (named, path.as_str()) {
        (Some(field), ".") => field.to_owned(),
        (Some(field), p) if p != field && !p.ends_with(&format!(".{field}")) => format!("{p}.{field}"),
        (_, ".") => "body".to_owned(),
        (_, p) => p.to_owned(),
    };
    ApiError::invalid(param, message)
}

/// serde_json appends " at line L column C"; clients get the field name instead.
fn strip_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(i) if error.line() > 0 => text[..i].to_owned(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // Fields exist to be deserialised into.
    struct Outer {
        name: String,
        n: Option<usize>,
        #[serde(default)]
        items: Vec<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        stage: usize,
    }

    fn param(body: &str) -> String {
        match parse::<Outer>(body.as_bytes()) {
            Err(ApiError::Invalid { param, .. }) => param,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(param(r#"{"name": "a", "colour": 1}"#), "colour");
        assert_eq!(param(r#"{"n": 1}"#), "name");
        assert_eq!(param(r#"{"name": "a", "n": "two"}"#), "n");
        assert_eq!(param(r#"{"name": "a", "n": -1}"#), "n");
        assert_eq!(param(r#"{"name": "a", "items": [{"stage": 1, "x": 2}]}"#), "items[0].x");
        assert_eq!(param(r#"{"name": "a", "items": [{}]}"#), "items[0].stage");
        assert_eq!(param(r#"{"name": "a""#), "body");
        assert_eq!(param(r#"{"name": "a"} x"#), "body");
        assert!(parse::<Outer>(br#"{"name": "a", "n": 3}"#).is_ok());
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        for (v, ok) in
            [("application/json", true), ("Application/JSON; charset=utf-8", true), ("application/merge-patch+json", true), ("text/plain", false)]
        {
            h.insert(header::CONTENT_TYPE, v.parse().unwrap());
            assert_eq!(is_json(&h), ok, "{v}");
        }
    }
}
