//! The HTTP layer's one error type and the one place errors become responses.
//!
//! Follows TGI's router (`router/src/server.rs`: one enum, a stable
//! `error_type` tag per variant, one `IntoResponse`) and axum's
//! `examples/error-handling`. Every variant has a stable machine tag
//! ([`ApiError::error_type`]) that clients and the `outcome` metric label use;
//! messages are safe to show — internal details (store, queue, torch errors) go
//! to the log under the request's span, never into a body.
//!
//! Two envelopes share the mapping: the native one,
//! `{"error": {"type", "message", "param"}}`, and OpenAI's,
//! `{"error": {"message", "type", "param", "code"}}` (see [`OpenAiError`]), whose
//! `type` is OpenAI's coarse category and whose `code` is our tag.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::state::ApiConfig;
use crate::jobs::{JobError, JobId, QueueError, StoreError};
use crate::pipeline::PipelineError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request value the server cannot accept; `param` names the field.
    #[error("invalid `{param}`: {message}")]
    Invalid { param: String, message: String },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body must be {expected} (Content-Type: {expected})")]
    UnsupportedMediaType { expected: &'static str },
    #[error("a valid API key is required (Authorization: Bearer <key>)")]
    Unauthorized,
    /// An unknown job or image — or one that belongs to another API key, which
    /// must look exactly the same.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// `PUT /jobs/{id}` with an id another API key already uses.
    #[error("job id {0} is taken")]
    IdTaken(JobId),
    /// A sync request whose job was canceled before it finished.
    #[error("the job was canceled")]
    Canceled,
    #[error("the queue is full ({depth} jobs waiting); retry later")]
    QueueFull { depth: usize, retry_after_secs: u64 },
    /// Models are loading, or failed to load (`reason` says which, without paths).
    #[error("the server is not ready: {reason}")]
    NotReady { reason: &'static str, retry_after_secs: u64 },
    #[error("the server is shutting down")]
    ShuttingDown { retry_after_secs: u64 },
    /// A sync request outlived the server's bound; its job was canceled.
    #[error("the job did not finish within {secs} s; use `Prefer: respond-async` for long jobs")]
    Timeout { secs: u64 },
    /// The job failed; its error is already safe to show.
    #[error("{}", .0.message)]
    JobFailed(JobError),
    /// Anything else; the string is for the log only.
    #[error("internal server error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { param: param.into(), message: message.into() }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::Internal(detail.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::IdTaken(_) | Self::Canceled => StatusCode::CONFLICT,
            Self::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotReady { .. } | Self::ShuttingDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::JobFailed(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine tag (the `type` of native errors, the `code` of OpenAI ones).
    pub fn error_type(&self) -> &str {
        match self {
            Self::Invalid { .. } => "invalid_request",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnsupportedMediaType { .. } => "unsupported_media_type",
            Self::Unauthorized => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::IdTaken(_) => "id_taken",
            Self::Canceled => "canceled",
            Self::QueueFull { .. } => "queue_full",
            Self::NotReady { .. } => "not_ready",
            Self::ShuttingDown { .. } => "shutting_down",
            Self::Timeout { .. } => "timeout",
            Self::JobFailed(e) => &e.kind,
            Self::Internal(_) => "internal_error",
        }
    }

    pub fn param(&self) -> Option<&str> {
        match self {
            Self::Invalid { param, .. } => Some(param),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::QueueFull { retry_after_secs, .. } | Self::NotReady { retry_after_secs, .. } | Self::ShuttingDown { retry_after_secs } => {
                Some(*retry_after_secs)
            }
            _ => None,
        }
    }

    /// OpenAI's coarse error category for this status.
    fn openai_type(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// Logs what the client will not see, then builds the response with `body`.
    fn respond(&self, body: serde_json::Value) -> Response {
        match self {
            Self::Internal(detail) => tracing::error!(detail = %detail, "internal error"),
            Self::JobFailed(e) => tracing::warn!(error_type = %e.kind, message = %e.message, "job failed"),
            e if e.status().is_server_error() => tracing::warn!(error = %e, "request refused"),
            _ => {}
        }
        let mut response = (self.status(), Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, Self::Unauthorized) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The native error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine tag, e.g. `invalid_request`, `queue_full`, `not_found`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    /// The offending request field, for `invalid_request`.
    pub param: Option<String>,
}

/// OpenAI's error body (`/v1/*` routes).
#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    pub message: String,
    /// OpenAI's category: `invalid_request_error`, `authentication_error`, …
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    /// Our stable machine tag (as `type` in native errors).
    pub code: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail { kind: self.error_type().to_owned(), message: self.to_string(), param: self.param().map(str::to_owned) },
        };
        self.respond(serde_json::to_value(body).expect("error bodies serialise"))
    }
}

/// An [`ApiError`] rendered in OpenAI's envelope.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl OpenAiError {
    /// The envelope, for a response or a stream's `error` event.
    pub fn body(&self) -> OpenAiErrorBody {
        let e = &self.0;
        OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: e.to_string(),
                kind: e.openai_type().to_owned(),
                param: e.param().map(str::to_owned),
                code: e.error_type().to_owned(),
            },
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_value(self.body()).expect("error bodies serialise");
        self.0.respond(body)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Invalid { field, reason } => Self::Invalid { param: field, message: reason },
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::Full { depth, retry_after_secs } => Self::QueueFull { depth, retry_after_secs },
            // Draining: another replica (or this one, restarted) will take it.
            QueueError::Closed => Self::ShuttingDown { retry_after_secs: ApiConfig::DEFAULT_RETRY_AFTER_SECS },
            // The shared queue (Redis) is down: a 503 that says so, not a full queue.
            QueueError::Unavailable { retry_after_secs } => Self::NotReady { reason: "the job queue is unavailable", retry_after_secs },
        }
    }
}
