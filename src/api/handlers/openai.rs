//! `POST /v1/images/generations`: OpenAI's Images API
//! (<https://platform.openai.com/docs/api-reference/images/create>), always
//! sync, errors in OpenAI's envelope (`{"error": {message, type, param, code}}`).
//!
//! The request becomes a native generate body and runs exactly like a sync
//! `POST /generate`, including cancel-on-disconnect and the sync timeout.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};
use base64::Engine;
use uuid::Uuid;

use super::generate::run_sync;
use crate::api::admit::{record_outcome, validate};
use crate::api::auth::Caller;
use crate::api::errors::{ApiError, OpenAiError, OpenAiErrorBody};
use crate::api::extract::ApiJson;
use crate::api::observe::request_id;
use crate::api::schemas::job::image_url;
use crate::api::schemas::{ImageData, ImagesRequest, ImagesResponse, ResponseFormat};
use crate::api::state::AppState;
use crate::api::sync;
use crate::jobs::{now_ms, JobRecord};

#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "openai",
    request_body = ImagesRequest,
    responses(
        (status = 200, description = "The finished images", body = ImagesResponse),
        (status = 401, description = "Missing or invalid API key", body = OpenAiErrorBody),
        (status = 409, description = "The job was canceled before it finished", body = OpenAiErrorBody),
        (status = 413, description = "The body is larger than the server accepts", body = OpenAiErrorBody),
        (status = 415, description = "The body is not JSON", body = OpenAiErrorBody),
        (status = 422, description = "A field is invalid; `param` names it", body = OpenAiErrorBody),
        (status = 429, description = "The queue is full", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 500, description = "The job failed (`code` is its error type), or the server did", body = OpenAiErrorBody),
        (status = 503, description = "Models are loading, failed to load, or the server is shutting down", body = OpenAiErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 504, description = "The job did not finish within the server's limit (it is canceled)", body = OpenAiErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn images_generations(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<ApiJson<ImagesRequest>, ApiError>,
) -> Result<Json<ImagesResponse>, OpenAiError> {
    let result = generate(&state, caller, &headers, body).await;
    record_outcome(&result);
    Ok(Json(result?))
}

async fn generate(state: &AppState, caller: Caller, headers: &HeaderMap, body: Result<ApiJson<ImagesRequest>, ApiError>) -> Result<ImagesResponse, ApiError> {
    let ApiJson(body) = body?;
    let request = validate(state, &body.to_generate())?;
    let job = JobRecord::new(Uuid::new_v4(), caller.owner, request, now_ms()).with_request_id(request_id(headers));
    let record = run_sync(state, job).await?;
    let data = match body.response_format.unwrap_or_default() {
        ResponseFormat::Url => {
            record.images.iter().map(|i| ImageData { b64_json: None, url: Some(image_url(record.id, i.index)), seed: i.seed }).collect()
        }
        ResponseFormat::B64Json => {
            let pngs = sync::pngs(state, &record).await?;
            record
                .images
                .iter()
                .zip(pngs)
                .map(|(i, png)| ImageData { b64_json: Some(base64::engine::general_purpose::STANDARD.encode(png)), url: None, seed: i.seed })
                .collect()
        }
    };
    Ok(ImagesResponse { created: record.created_at.div_euclid(1000), data, id: record.id })
}
